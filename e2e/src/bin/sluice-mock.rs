//! `sluice-mock`: the mock OpenAI provider as a process, steered through `/_mock/...`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use sluice_e2e::logs::{self, LogFormat};
use sluice_e2e::mock::{MockConfig, MockServer};

/// A mock upstream provider: OpenAI (chat, completions, embeddings, models, responses) and Anthropic (messages, count_tokens), SSE, fault injection.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9090")]
    listen: SocketAddr,
    /// Name shown in `x-mock-name` and in completion texts.
    #[arg(long, default_value = "mock")]
    name: String,
    /// Models served (repeat or comma-separate); none = any model.
    #[arg(long = "model", value_delimiter = ',')]
    models: Vec<String>,
    /// Require `Authorization: Bearer <key>`.
    #[arg(long, env = "SLUICE_MOCK_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Take the key from this header alone, bare (`api-key`, as Azure OpenAI's deployments;
    /// `authorization` for a bearer token only).
    #[arg(long, value_name = "HEADER")]
    key_header: Option<String>,
    /// Wait before each answer, e.g. `50ms`.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    latency: Duration,
    /// Content chunks per stream (= completion tokens).
    #[arg(long, default_value_t = 5)]
    chunk_count: usize,
    /// Wait between SSE events, e.g. `20ms`.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    chunk_interval: Duration,
    /// Embedding size.
    #[arg(long, default_value_t = 8)]
    embedding_dims: usize,
    /// Pieces a streamed tool call's arguments come in.
    #[arg(long, default_value_t = 2)]
    tool_call_pieces: usize,
    /// Behave as Mistral's API: refuse `stream_options` (422) and send a stream's usage in its
    /// last chunk, unasked.
    #[arg(long)]
    refuse_stream_options: bool,
    /// Serve requests the mock would serve at one tier at another, as `TIER=INSTEAD`
    /// (repeat): `auto=` is `default=`, `fast=` is `priority=`.
    #[arg(long = "serve-tier", value_name = "TIER=INSTEAD", value_parser = tier_pair)]
    serve_tiers: Vec<(String, String)>,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    logs::init(args.log_format);

    let config = MockConfig {
        name: args.name,
        models: args.models,
        api_key: args.api_key,
        key_header: args.key_header.map(|h| h.to_ascii_lowercase()),
        latency: args.latency,
        chunk_count: args.chunk_count,
        chunk_interval: args.chunk_interval,
        embedding_dims: args.embedding_dims,
        tool_call_pieces: args.tool_call_pieces,
        refuses_stream_options: args.refuse_stream_options,
        served_tiers: args.serve_tiers,
    };
    let server = MockServer::start(config, args.listen)
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!("http listening on {}", server.addr());

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r?,
    }
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

/// A `--serve-tier` value: two tiers the mock serves at.
fn tier_pair(value: &str) -> Result<(String, String), String> {
    const TIERS: [&str; 5] = ["default", "priority", "flex", "scale", "ultrafast"];
    let tier = |name: &str| match name {
        "auto" => Ok("default"),
        "fast" => Ok("priority"),
        name => TIERS
            .into_iter()
            .find(|t| *t == name)
            .ok_or_else(|| format!("not a tier: `{name}` (one of {})", TIERS.join(", "))),
    };
    let (from, instead) = value
        .split_once('=')
        .ok_or_else(|| format!("`{value}` is not TIER=INSTEAD"))?;
    Ok((tier(from)?.to_owned(), tier(instead)?.to_owned()))
}
