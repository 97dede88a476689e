//! `sluice-control`: parse configuration, start, run until SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use sluice_control::secrets::SecretSources;
use sluice_control::server::{self, Config, GrpcOptions, HttpOptions, TlsFiles};
use sluice_control::store::DB_FILE;

/// The Sluice control plane: stores backends, provider keys (encrypted), client keys,
/// cooldowns and usage in SQLite, serves the admin API over gRPC and streams routing
/// snapshots to data planes.
///
/// Secrets: SLUICE_ADMIN_TOKEN or --admin-token-file, SLUICE_DATAPLANE_TOKEN or
/// --dataplane-token-file, SLUICE_MASTER_KEY (base64 of 32 bytes) or --master-key-file; a
/// variable wins over the file option for the same secret. Any not given is read from, or on
/// first start generated into, the data directory (files admin-token, dataplane-token,
/// master-key; mode 0600).
///
/// Every option can also come from its environment variable or from a TOML file given with
/// --config (keys are the long option names, e.g. `grpc_listen = "0.0.0.0:50051"`; secrets
/// stay out of it: name the files that hold them). Precedence: command line, then
/// environment, then the file, then the default shown.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Args {
    /// TOML file with any of the options below.
    #[arg(long, env = "SLUICE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Directory holding the SQLite database (sluice.db) and generated secrets.
    #[arg(
        long,
        env = "SLUICE_DATA_DIR",
        default_value = "./sluice-data",
        global = true
    )]
    data_dir: PathBuf,
    /// Address of the gRPC listener: AdminService, StatsService, DataPlaneService, gRPC health
    /// and reflection (port 0 picks a free one).
    #[arg(long, env = "SLUICE_GRPC_LISTEN", default_value = "127.0.0.1:50051")]
    grpc_listen: SocketAddr,
    /// Address of the HTTP listener: the dashboard (/), its JSON API (/api/…), /healthz,
    /// /readyz and /metrics.
    #[arg(long, env = "SLUICE_HTTP_LISTEN", default_value = "127.0.0.1:8081")]
    http_listen: SocketAddr,
    /// Host names the HTTP listener answers to, besides IP addresses and localhost (comma-
    /// separated; `*` for any): the names browsers and Prometheus use to reach it, e.g.
    /// `sluice.example.com`. Other names are refused (403) so that a page on another domain
    /// cannot read the dashboard or /metrics through DNS rebinding.
    #[arg(long, env = "SLUICE_ALLOWED_HOSTS", value_delimiter = ',')]
    allowed_hosts: Vec<String>,
    /// How long a client of the HTTP listener may take to send a request's headers (the
    /// first request's from when it connected, a later one's on a kept-alive connection from
    /// its first byte, give or take this much again); past it the connection is closed (e.g.
    /// 30s, 2m).
    #[arg(long, env = "SLUICE_HTTP_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = sluice_domain::time::positive_duration)]
    http_header_read_timeout: std::time::Duration,
    /// How long a kept-alive HTTP/1 connection to the HTTP listener may stay idle (no byte of
    /// a next request) before it is closed; keep it above the idle timeout of a load balancer
    /// in front (e.g. 75s, 11m).
    #[arg(long, env = "SLUICE_HTTP_IDLE_TIMEOUT", default_value = "75s", value_parser = sluice_domain::time::positive_duration)]
    http_idle_timeout: std::time::Duration,
    /// How long a write to a client of the HTTP listener may wait for the client to accept
    /// any of it; past it the connection is closed, counted in
    /// sluice_http_write_timeouts_total (e.g. 60s, 2m).
    #[arg(long, env = "SLUICE_HTTP_WRITE_TIMEOUT", default_value = "60s", value_parser = sluice_domain::time::positive_duration)]
    http_write_timeout: std::time::Duration,
    /// Connections to the HTTP listener open at once; past it a new one gets 503 and is
    /// closed (counted in sluice_http_connections_refused_total).
    #[arg(long, env = "SLUICE_HTTP_MAX_CONNECTIONS", default_value_t = server::DEFAULT_HTTP_MAX_CONNECTIONS)]
    http_max_connections: usize,
    /// Connections to the gRPC listener open at once; past it a new one is refused (an
    /// HTTP/2 GOAWAY, then closed) and counted in sluice_grpc_connections_refused_total. Each
    /// data plane holds two, each sluicectl one.
    #[arg(long, env = "SLUICE_GRPC_MAX_CONNECTIONS", default_value_t = server::DEFAULT_GRPC_MAX_CONNECTIONS)]
    grpc_max_connections: usize,
    /// How long a new connection to the gRPC listener may take to make its first request with
    /// a token, admin or data-plane (its TLS handshake included; requests that need none are
    /// answered meanwhile); past it, and a second's grace, the connection is closed (e.g.
    /// 10s, 1m).
    #[arg(long, env = "SLUICE_GRPC_FIRST_REQUEST_TIMEOUT", default_value = "10s", value_parser = sluice_domain::time::positive_duration)]
    grpc_first_request_timeout: std::time::Duration,
    /// File holding the base64 master key that encrypts provider keys (SLUICE_MASTER_KEY
    /// wins if set). Default: <data-dir>/master-key, generated on first start.
    #[arg(long, env = "SLUICE_MASTER_KEY_FILE", global = true)]
    master_key_file: Option<PathBuf>,
    /// File holding the admin token that AdminService, StatsService and the JSON API require
    /// (SLUICE_ADMIN_TOKEN wins if set). Default: <data-dir>/admin-token, generated on first
    /// start.
    #[arg(long, env = "SLUICE_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// File holding the token data planes must present (SLUICE_DATAPLANE_TOKEN wins if set).
    /// Default: <data-dir>/dataplane-token, generated on first start.
    #[arg(long, env = "SLUICE_DATAPLANE_TOKEN_FILE")]
    dataplane_token_file: Option<PathBuf>,
    /// PEM certificate chain for TLS on the gRPC listener (with --tls-key).
    #[arg(long, env = "SLUICE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS on the gRPC listener (with --tls-cert).
    #[arg(long, env = "SLUICE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Log format on stderr; RUST_LOG filters (default info).
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Tests only: run the control plane's wall clock this far ahead (or behind, `-2s`) of
    /// the host's, as a skewed host clock would; every expiry, budget period and UTC-midnight
    /// reset follows it. Hidden: a production control plane has no use for it.
    #[arg(
        long,
        env = "SLUICE_WALL_CLOCK_OFFSET",
        hide = true,
        allow_hyphen_values = true
    )]
    wall_clock_offset: Option<sluice_domain::time::WallOffset>,
    /// Tests and benchmarks only: every daily, weekly and monthly budget period lasts this
    /// long (e.g. 1s) instead of a UTC day, week or month, so budgets reset many times a run.
    /// Hidden: a production control plane started with it resets every budget that often.
    #[arg(long, env = "SLUICE_BUDGET_PERIOD_LENGTH", hide = true, value_parser = humantime::parse_duration)]
    budget_period_length: Option<std::time::Duration>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a consistent copy of the database to OUT while the control plane runs (one read
    /// transaction: it finishes however busy the control plane is). OUT must not exist. Keep
    /// the master key with it: without it the copy's provider keys cannot be read.
    Backup {
        /// The file to write (its directory must exist).
        out: PathBuf,
    },
    /// Re-encrypt every stored provider key under a new master key, in one transaction.
    /// Stop the control plane first. With the generated data-dir key, the new key
    /// replaces the master-key file; otherwise pass the new key to the next start.
    RotateMasterKey {
        /// File holding the new base64 master key; without it a new key is generated
        /// into the data directory (only when the current key is the data-dir file).
        #[arg(long)]
        new_master_key_file: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    sluice_domain::logging::install(matches!(format, LogFormat::Json), std::io::stderr);
}

fn secret_sources(args: &Args) -> SecretSources {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    SecretSources {
        admin_token: env("SLUICE_ADMIN_TOKEN"),
        admin_token_file: args.admin_token_file.clone(),
        dataplane_token: env("SLUICE_DATAPLANE_TOKEN"),
        dataplane_token_file: args.dataplane_token_file.clone(),
        master_key: env("SLUICE_MASTER_KEY"),
        master_key_file: args.master_key_file.clone(),
    }
}

/// The data directory's subdirectory for SQLite's temporary files (large sorts).
const TEMP_DIR: &str = "tmp";

#[tokio::main]
async fn main() {
    let sluice_config::Parsed {
        options: args,
        overridden,
    } = sluice_config::parse_from::<Args, _, _>(Args::command(), "config", std::env::args_os())
        .unwrap_or_else(|e| e.exit());
    init_logging(args.log_format);
    overridden.iter().for_each(sluice_config::Overridden::warn);
    #[cfg(unix)]
    match sluice_listener::raise_open_files_limit() {
        Ok(limit) => tracing::debug!(limit, "open files"),
        Err(err) => tracing::warn!(error = %err, "cannot raise the open-files limit"),
    }
    // Before any database is open (the setting is the process's).
    let temp = args.data_dir.join(TEMP_DIR);
    if let Err(err) = sluice_control::store::keep_temp_files_in(&temp) {
        eprintln!(
            "sluice-control: cannot use {} for the database's temporary files: {err}",
            temp.display()
        );
        std::process::exit(1);
    }
    let result = match &args.command {
        None => run(&args).await,
        Some(Command::RotateMasterKey {
            new_master_key_file,
        }) => sluice_control::master_key::rotate(
            &args.data_dir,
            &secret_sources(&args),
            new_master_key_file.as_deref(),
        ),
        Some(Command::Backup { out }) => backup(&args, out),
    };
    if let Err(err) = result {
        // One readable line: the chain of causes, no backtrace. SQLite says "disk I/O error"
        // when it cannot even create its shared-memory file on a full volume: that is said.
        let hint = if args.command.is_none() && volume_is_full(&args.data_dir) {
            format!(
                " (the volume holding {} is full: free space on it or grow it, then start again)",
                args.data_dir.display()
            )
        } else if is_read_only(&err) {
            not_writable(&args.data_dir)
        } else {
            String::new()
        };
        eprintln!("sluice-control: {}{hint}", one_line(&err));
        std::process::exit(1);
    }
}

/// The error's causes on one line, each said once: SQLite's own causes repeat the message the
/// error above them quotes ("attempt to write a readonly database" three times, the last as
/// "Error code 8: Attempt to write …"). A cause whose message, or its last part, is already
/// in the line is left out.
fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        let said = line.to_lowercase();
        let last_part = text.rsplit(": ").next().unwrap_or_default().to_lowercase();
        if said.contains(&text.to_lowercase()) || said.contains(&last_part) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Whether SQLite refused to write the database (`SQLITE_READONLY`).
fn is_read_only(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<rusqlite::Error>()
            .and_then(rusqlite::Error::sqlite_error_code)
            == Some(rusqlite::ErrorCode::ReadOnly)
    })
}

/// What to do when the database cannot be written: most often a restore copied as another
/// user (root) than the one the control plane runs as.
fn not_writable(dir: &std::path::Path) -> String {
    use std::os::unix::fs::MetadataExt as _;
    let db = dir.join(DB_FILE);
    let owner = std::fs::metadata(&db)
        .map(|m| {
            format!(
                ", owned by uid {} with mode {:o}",
                m.uid(),
                m.mode() & 0o7777
            )
        })
        .unwrap_or_default();
    let (who, give) = match effective_uid() {
        Some(uid) => (
            format!(", uid {uid}"),
            format!("uid {uid} (chown {uid} {}*)", db.display()),
        ),
        None => (
            String::new(),
            "the user the control plane runs as".to_owned(),
        ),
    };
    format!(
        " ({}{owner}, its -wal and -shm files or their directory cannot be written by this \
         process{who}: a restore copied as another user? Give them to {give}, then start again)",
        db.display()
    )
}

/// The user this process runs as (Linux: `/proc/self/status`), without `unsafe` for geteuid.
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let ids = status.lines().find_map(|line| line.strip_prefix("Uid:"))?;
    // Real, effective, saved, filesystem.
    ids.split_whitespace().nth(1)?.parse().ok()
}

/// Whether the volume holding `dir` has no room left: a small file written there (and
/// removed) finds it full.
fn volume_is_full(dir: &std::path::Path) -> bool {
    let probe = dir.join(".space-probe");
    let Ok(mut file) = std::fs::File::create_new(&probe) else {
        return false;
    };
    let full = refuses_for_space(&mut file);
    drop(file);
    let _ = std::fs::remove_file(&probe);
    full
}

/// Whether writing 64 KiB into `file` fails for want of space.
fn refuses_for_space(file: &mut std::fs::File) -> bool {
    use std::io::Write as _;
    file.write_all(&[0; 64 * 1024])
        .and_then(|()| file.sync_data())
        .is_err_and(|e| e.kind() == std::io::ErrorKind::StorageFull)
}

async fn run(args: &Args) -> anyhow::Result<()> {
    // Register the handlers before anything listens: a SIGTERM that arrives right after the
    // "listening on" line must stop us cleanly, not kill us.
    let signal = shutdown_signal()?;
    if let Some(offset) = args.wall_clock_offset {
        sluice_control::time::skew_wall_clock(offset.as_millis());
        tracing::warn!(
            offset_ms = offset.as_millis(),
            "the wall clock is offset (--wall-clock-offset): for tests only; expiries and \
             budget resets follow the offset clock"
        );
    }
    if let Some(length) = args.budget_period_length {
        let length_ms = i64::try_from(length.as_millis()).unwrap_or(i64::MAX).max(1);
        sluice_control::budget::shorten_periods(length_ms);
        tracing::warn!(
            length_ms,
            "budget periods are shortened (--budget-period-length): for tests only; every \
             periodic budget resets this often"
        );
    }
    let running = server::start(Config {
        data_dir: args.data_dir.clone(),
        grpc_listen: args.grpc_listen,
        http_listen: args.http_listen,
        http: HttpOptions {
            allowed_hosts: args.allowed_hosts.clone(),
            header_read_timeout: args.http_header_read_timeout,
            idle_timeout: args.http_idle_timeout,
            write_timeout: args.http_write_timeout,
            max_connections: args.http_max_connections,
        },
        grpc: GrpcOptions {
            max_connections: args.grpc_max_connections,
            first_request_timeout: args.grpc_first_request_timeout,
        },
        secrets: secret_sources(args),
        tls: match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        },
    })
    .await?;
    let stop = running.stop_token();
    tokio::spawn(async move {
        signal.await;
        tracing::info!("shutting down");
        stop.cancel();
    });
    running.wait().await?;
    Ok(())
}

/// A future that completes on SIGTERM or SIGINT; the handlers are registered when this is called.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

fn backup(args: &Args, out: &std::path::Path) -> anyhow::Result<()> {
    let done = sluice_control::store::backup::backup(&args.data_dir.join(DB_FILE), out)?;
    println!(
        "backed up {} to {} ({} bytes in {:.1?}); keep the master key with it, and the \
         admin-token and dataplane-token files when the control plane generated them",
        args.data_dir.join(DB_FILE).display(),
        out.display(),
        done.bytes,
        done.took
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]
    use super::*;

    /// A volume with no room left is told apart from one with room (`/dev/full` refuses every
    /// write for want of space, as a full volume does).
    #[test]
    fn a_full_volume_is_told_apart() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        assert!(!volume_is_full(dir.path()));
        assert!(
            std::fs::read_dir(dir.path())
                .expect("listed")
                .next()
                .is_none()
        );
        let mut full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full");
        assert!(refuses_for_space(&mut full));
    }
}
