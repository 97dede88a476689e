//! `sluice-bench`: the benchmarks. `all` starts a whole Sluice with the mock provider, measures
//! everything against the mock called directly and writes `BENCHMARKS.md`; `load` drives any
//! OpenAI-compatible URL with the same load generator.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use sluice_e2e::bench::client::Target;
use sluice_e2e::bench::cluster::ClusterConfig;
use sluice_e2e::bench::report::{Report, checks_table};
use sluice_e2e::bench::suite::{self, ExternalConfig, ExternalMode, SuiteConfig};
use sluice_e2e::bench::{machine, spinners};
use sluice_e2e::logs::{self, LogFormat};

/// Benchmarks for Sluice: latency, throughput, streaming, memory and propagation, each measured
/// against the mock provider called directly in the same run.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Format of the progress log on stderr.
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Start a Sluice cluster on loopback, run every benchmark, print the tables and write
    /// BENCHMARKS.md.
    All(AllArgs),
    /// Drive any OpenAI-compatible base URL (another gateway too) and print the table.
    Load(LoadArgs),
    /// Burn CPU (run by `all` at idle priority to keep the CPUs awake).
    #[command(hide = true)]
    Spin {
        /// Stop after this long at the latest.
        #[arg(long, default_value = "30m", value_parser = duration)]
        max: Duration,
    },
}

fn duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

#[derive(Args)]
struct AllArgs {
    /// Where to write the report; default BENCHMARKS.md (none with --quick).
    #[arg(long)]
    out: Option<PathBuf>,
    /// A short smoke run (seconds instead of minutes; figures are noisy).
    #[arg(long)]
    quick: bool,
    /// Open-loop request rates (req/s).
    #[arg(long, value_delimiter = ',', default_value = "250,500,1000")]
    rates: Vec<f64>,
    /// Measured time per rate and path.
    #[arg(long, default_value = "15s", value_parser = duration)]
    duration: Duration,
    /// Interleaved slices per path (A B B A …).
    #[arg(long, default_value_t = 15)]
    segments: usize,
    /// Unmeasured warm-up per rate and path.
    #[arg(long, default_value = "1s", value_parser = duration)]
    warmup: Duration,
    /// Connections of the saturation run.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Measured saturation time per path.
    #[arg(long, default_value = "10s", value_parser = duration)]
    saturation: Duration,
    /// Concurrent SSE streams.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Content chunks per stream.
    #[arg(long, default_value_t = 20)]
    chunk_count: usize,
    /// Time between chunks.
    #[arg(long, default_value = "50ms", value_parser = duration)]
    chunk_interval: Duration,
    /// Stream starts are spread over this time.
    #[arg(long, default_value = "500ms", value_parser = duration)]
    stream_ramp: Duration,
    /// Measured stream rounds per path.
    #[arg(long, default_value_t = 2)]
    stream_rounds: usize,
    /// Rounds of each propagation measurement.
    #[arg(long, default_value_t = 100)]
    propagation_rounds: usize,
    /// How often replicas are polled during propagation rounds.
    #[arg(long, default_value = "1ms", value_parser = duration)]
    poll_interval: Duration,
    /// Bound on one request.
    #[arg(long, default_value = "10s", value_parser = duration)]
    timeout: Duration,
    /// Where sluice-control, sluice-proxy and sluice-mock are; default next to this binary.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Logs of the started processes.
    #[arg(long, default_value = "target/sluice-bench-logs")]
    log_dir: PathBuf,
    /// RUST_LOG of the data planes.
    #[arg(long, default_value = "info")]
    proxy_log: String,
    /// Skip the usage-ingestion benchmark even if sluice-bench-ingest is built.
    #[arg(long)]
    no_ingest: bool,
    /// Do not run idle-priority CPU spinners during the measurements (see BENCHMARKS.md).
    #[arg(long)]
    no_spinners: bool,
    /// Run only the propagation rounds (three data planes: admin write, 429 cooldown, budget
    /// raised, key revoked, key expired, budget period reset) and print them; writes no report
    /// unless --out is given.
    #[arg(long)]
    only_propagation: bool,
}

#[derive(Args)]
struct LoadArgs {
    /// Base URL of the gateway, as an OpenAI SDK takes it, e.g. http://127.0.0.1:4000/v1.
    #[arg(long)]
    url: String,
    /// API key for the gateway.
    #[arg(long, env = "SLUICE_BENCH_KEY", hide_env_values = true)]
    key: Option<String>,
    /// Model to request.
    #[arg(long)]
    model: String,
    /// Also run the same load against this URL (e.g. the provider behind the gateway) and show
    /// the difference.
    #[arg(long)]
    baseline_url: Option<String>,
    #[arg(long, env = "SLUICE_BENCH_BASELINE_KEY", hide_env_values = true)]
    baseline_key: Option<String>,
    /// Model for the baseline; default --model.
    #[arg(long)]
    baseline_model: Option<String>,
    /// Open-loop request rates (req/s).
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    rate: Vec<f64>,
    /// Measured time per rate and URL (saturation: per URL).
    #[arg(long, default_value = "15s", value_parser = duration)]
    duration: Duration,
    /// Interleaved slices per URL (A B B A …).
    #[arg(long, default_value_t = 15)]
    segments: usize,
    #[arg(long, default_value = "1s", value_parser = duration)]
    warmup: Duration,
    #[arg(long, default_value = "10s", value_parser = duration)]
    timeout: Duration,
    /// Closed loop at saturation instead of fixed rates.
    #[arg(long, conflicts_with = "stream")]
    saturate: bool,
    /// Connections of --saturate.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Concurrent SSE streams instead of fixed rates.
    #[arg(long)]
    stream: bool,
    /// Anthropic Messages requests (POST …/messages) instead of chat completions, to both
    /// URLs; with --stream, streamed Messages, each ending with `message_stop`.
    #[arg(long)]
    messages: bool,
    /// A coding agent's requests (about 60 KB: a system prompt, sixteen tools, five rounds of
    /// tool calls and results; with --messages in Claude Code's shape) instead of short ones.
    #[arg(long)]
    agent: bool,
    /// Short requests that offer a tool and ask for a call of it (the answer: a tool call).
    #[arg(long, conflicts_with = "agent")]
    tool_call: bool,
    /// Streams of --stream.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Stream starts are spread over this time.
    #[arg(long, default_value = "500ms", value_parser = duration)]
    ramp: Duration,
    /// SSE events each stream should deliver, [DONE] included (counts lost events).
    #[arg(long)]
    expected_events: Option<u64>,
    /// Measured stream rounds per URL.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Allow a URL that is not on this machine.
    #[arg(long)]
    allow_remote: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Spin { max } = cli.command {
        spinners::spin(max);
        return Ok(());
    }
    logs::init(cli.log_format);
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    match cli.command {
        Command::All(args) => runtime.block_on(all(args)),
        Command::Load(args) => runtime.block_on(load(args)),
        Command::Spin { .. } => Ok(()),
    }
}

async fn all(args: AllArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let bin_dir = args.bin_dir.clone().unwrap_or_else(|| exe_dir.clone());
    let ingest = (!args.no_ingest).then(|| bin_dir.join("sluice-bench-ingest"));
    let spinner_exe = if args.no_spinners || args.only_propagation {
        None
    } else {
        Some(std::env::current_exe().context("finding this executable for the spinners")?)
    };
    let mut config = SuiteConfig {
        cluster: ClusterConfig {
            bin_dir,
            log_dir: args.log_dir.clone(),
            proxy_log: args.proxy_log.clone(),
        },
        rates: args.rates.clone(),
        duration: args.duration,
        segments: args.segments,
        warmup: args.warmup,
        connections: args.connections,
        saturation: args.saturation,
        streams: args.streams,
        chunk_count: args.chunk_count,
        chunk_interval: args.chunk_interval,
        stream_ramp: args.stream_ramp,
        stream_rounds: args.stream_rounds,
        propagation_rounds: args.propagation_rounds,
        poll_interval: args.poll_interval,
        only_propagation: args.only_propagation,
        ingest,
        spinner_exe,
        timeout: args.timeout,
    };
    if args.quick {
        config.rates = vec![250.0, 1000.0];
        config.duration = Duration::from_secs(2);
        config.segments = 4;
        config.warmup = Duration::from_millis(300);
        config.saturation = Duration::from_secs(2);
        config.streams = config.streams.min(200);
        config.stream_rounds = 1;
        config.propagation_rounds = 10;
    }
    let out = match (&args.out, args.quick || args.only_propagation) {
        (Some(out), _) => Some(out.clone()),
        (None, false) => Some(PathBuf::from("BENCHMARKS.md")),
        (None, true) => None,
    };
    tracing::info!(load = %machine::loadavg(), "starting the benchmarks; process logs in {}", args.log_dir.display());
    let outcome = suite::run_all(&config, |section| {
        println!("## {}\n\n{}", section.title, section.body);
    })
    .await
    .context("the benchmark cluster did not start")?;
    println!("## Targets\n\n{}", checks_table(&outcome.checks).markdown());

    let command = std::env::var("SLUICE_BENCH_COMMAND")
        .unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" "));
    let report = Report {
        machine: machine::describe(Path::new(".")),
        command,
        date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        took: started.elapsed(),
        checks: outcome.checks,
        sections: outcome.sections,
    };
    if let Some(out) = out {
        std::fs::write(&out, report.markdown())
            .with_context(|| format!("writing {}", out.display()))?;
        tracing::info!("wrote {}", out.display());
    }
    Ok(())
}

async fn load(args: LoadArgs) -> anyhow::Result<()> {
    let speaking = |target: Target| {
        let target = if args.messages {
            target.speaking_messages()
        } else {
            target
        };
        if args.agent {
            target.as_agent()
        } else if args.tool_call {
            target.asking_for_a_tool_call()
        } else {
            target
        }
    };
    let target = Arc::new(speaking(Target::new(
        &args.url,
        args.key.as_deref(),
        &args.model,
        args.allow_remote,
    )?));
    let baseline = match &args.baseline_url {
        Some(url) => Some(Arc::new(speaking(Target::new(
            url,
            args.baseline_key.as_deref(),
            args.baseline_model.as_deref().unwrap_or(&args.model),
            args.allow_remote,
        )?))),
        None => None,
    };
    let mode = if args.saturate {
        ExternalMode::Saturate {
            connections: args.connections,
        }
    } else if args.stream {
        ExternalMode::Stream {
            streams: args.streams,
            ramp: args.ramp,
            expected_events: args.expected_events,
            rounds: args.rounds,
        }
    } else {
        ExternalMode::Rates(args.rate.clone())
    };
    let config = ExternalConfig {
        target,
        baseline,
        mode,
        duration: args.duration,
        segments: args.segments,
        warmup: args.warmup,
        timeout: args.timeout,
    };
    tracing::info!(load = %machine::loadavg(), "starting");
    let table = suite::run_external(&config).await?;
    println!("{table}");
    tracing::info!(load = %machine::loadavg(), "done");
    Ok(())
}
