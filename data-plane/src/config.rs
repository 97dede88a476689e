//! Command-line and environment configuration of `sluice-proxy`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use sluice_proto::limits::ALLOWANCE_LEASE;

use crate::logging::LogFormat;

/// The default for `--max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// The default for `--drain-delay` (the flag's `default_value` says the same).
pub const DEFAULT_DRAIN_DELAY: Duration = Duration::from_secs(2);

/// A secret string whose `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// `sluice-proxy`: the Sluice data plane, an OpenAI-compatible HTTP proxy that routes by the
/// snapshots the control plane streams to it and reports usage back.
///
/// Every option can also come from its environment variable or from a TOML file given with
/// --config (keys are the long option names, e.g. `listen = "0.0.0.0:8080"`). Precedence:
/// command line, then environment, then the file, then the default shown.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "sluice-proxy", version, about, long_about)]
pub struct Config {
    /// TOML file with any of the options below.
    #[arg(long, env = "SLUICE_CONFIG")]
    pub config: Option<PathBuf>,
    /// The control plane's gRPC address; `https://` uses TLS.
    #[arg(
        long,
        env = "SLUICE_CONTROL_PLANE",
        default_value = "http://127.0.0.1:50051"
    )]
    pub control_plane: String,
    /// PEM file of the CA that signed an `https://` control plane's certificate (default: the
    /// system's roots).
    #[arg(long, env = "SLUICE_CONTROL_PLANE_CA")]
    pub control_plane_ca: Option<PathBuf>,
    /// PEM file of CA certificates trusted for `https://` backends besides the bundled Mozilla
    /// roots: a provider or an in-house model server behind a private CA, or an egress proxy
    /// that intercepts TLS.
    #[arg(long, env = "SLUICE_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,
    /// Offer HTTP/2 to `https://` backends (ALPN). Off by default: each serving thread would
    /// carry all its requests to a provider host on one connection, so requests past the
    /// provider's limit of concurrent streams wait (and time out as the backend's failures),
    /// and a client slow to read its stream holds back the connection's other streams.
    #[arg(long, env = "SLUICE_UPSTREAM_HTTP2")]
    pub upstream_http2: bool,
    /// Address of the OpenAI-compatible HTTP listener, which also serves /healthz, /readyz and
    /// /metrics (port 0 picks a free one).
    #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Names this replica to the control plane (`sluicectl dataplane list`); default
    /// `<hostname>-<random>`.
    #[arg(long, env = "SLUICE_NODE_ID")]
    pub node_id: Option<String>,
    /// The data-plane token the control plane expects; wins over --dataplane-token-file
    /// (prefer the variable or the file: a flag shows in `ps`).
    #[arg(long, env = "SLUICE_DATAPLANE_TOKEN", hide_env_values = true)]
    pub dataplane_token: Option<Secret>,
    /// A file holding the data-plane token (surrounding whitespace ignored), read when
    /// --dataplane-token / SLUICE_DATAPLANE_TOKEN is not given.
    #[arg(long, env = "SLUICE_DATAPLANE_TOKEN_FILE")]
    pub dataplane_token_file: Option<PathBuf>,
    /// Largest accepted request body, in bytes; larger ones get 413.
    #[arg(long, env = "SLUICE_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Request-body bytes held in memory at once, over all connections; a request whose body
    /// would pass it gets 503 with Retry-After (slow uploads cannot pile up memory).
    #[arg(long, env = "SLUICE_MAX_BUFFERED_BODY_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_buffered_body_bytes: usize,
    /// Bytes of whole (non-streamed) answers held in memory at once, over all connections,
    /// each from when it is read until its client has taken it; an answer that would pass it
    /// gets 503 server_busy (clients slow to read large answers cannot pile up memory). At
    /// least --max-response-bytes.
    #[arg(long, env = "SLUICE_MAX_BUFFERED_ANSWER_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_buffered_answer_bytes: usize,
    /// Of --max-buffered-answer-bytes, what the answers to any one client key may hold at
    /// once; past it the key's answer gets 503 server_busy (one key's clients slow to read
    /// large answers cannot have every other key's refused). Default: half of
    /// --max-buffered-answer-bytes, and at least twice --max-response-bytes (an answer that
    /// declares no length is read into a buffer that doubles as it grows), at most
    /// --max-buffered-answer-bytes.
    #[arg(long, env = "SLUICE_MAX_BUFFERED_ANSWER_BYTES_PER_KEY")]
    pub max_buffered_answer_bytes_per_key: Option<usize>,
    /// How long a client may take to send a request's whole body once its headers arrived;
    /// past it the request gets 408 (e.g. 30s, 2m).
    #[arg(long, env = "SLUICE_BODY_READ_TIMEOUT", default_value = "30s", value_parser = sluice_domain::time::positive_duration)]
    pub body_read_timeout: Duration,
    /// How long a client may take to send a request's headers (the first request's from when
    /// it connected, a later one's on a kept-alive connection from its first byte, give or
    /// take this much again); past it the connection is closed (e.g. 30s, 2m).
    #[arg(long, env = "SLUICE_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = sluice_domain::time::positive_duration)]
    pub header_read_timeout: Duration,
    /// How long a kept-alive HTTP/1 connection may stay idle (no byte of a next request) before
    /// it is closed. Keep it above the idle timeout of whatever holds connections to the data
    /// plane (AWS's load balancers and ingress-nginx: 60s; Google Cloud's: 600s), or that front
    /// sometimes sends a request on a connection being closed and answers its client 502.
    #[arg(long, env = "SLUICE_IDLE_TIMEOUT", default_value = "75s", value_parser = sluice_domain::time::positive_duration)]
    pub idle_timeout: Duration,
    /// How long a write to a client may wait for the client to accept any of it (a client that
    /// stopped reading its answer); past it the connection is closed, counted in
    /// sluice_write_timeouts_total (e.g. 60s, 2m). A slow reader is not cut, only one that
    /// accepts nothing for this long.
    #[arg(long, env = "SLUICE_WRITE_TIMEOUT", default_value = "60s", value_parser = sluice_domain::time::positive_duration)]
    pub write_timeout: Duration,
    /// How long a stream may be silent before its client is sent an SSE comment
    /// (`: keep-alive`), so that a front's read timeout does not cut a model that thinks (AWS's
    /// load balancers and ingress-nginx cut at 60s by default); and how long after a streamed
    /// request arrived its stream is committed to its backend without its first event (the
    /// head sent, with a comment), which gives up failing it over to another backend. The
    /// official SDKs and browsers skip comments. 0 turns both off (e.g. 15s, 0).
    #[arg(long, env = "SLUICE_STREAM_KEEPALIVE", default_value = "15s", value_parser = humantime::parse_duration)]
    pub stream_keepalive: Duration,
    /// Client connections open at once; past it a new one gets 503 and is closed (counted in
    /// sluice_connections_refused_total). Keep it below half the file-descriptor limit: each
    /// request in flight also holds an upstream connection.
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Largest non-streamed upstream response body read, in bytes; a larger one fails the
    /// attempt (502 if nothing else answers).
    #[arg(long, env = "SLUICE_MAX_RESPONSE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_response_bytes: usize,
    /// Usage records held while the control plane has not acked them; beyond, the oldest are
    /// dropped and counted in sluice_usage_dropped_records_total.
    #[arg(long, env = "SLUICE_USAGE_QUEUE", default_value_t = crate::usage::DEFAULT_CAPACITY)]
    pub usage_queue: usize,
    /// On SIGTERM/SIGINT, how long in-flight requests and streams may take to finish (e.g.
    /// 30s, 2m). Give the orchestrator's grace period a little more.
    #[arg(long, env = "SLUICE_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// On SIGTERM/SIGINT, how long to keep serving as a lame duck before the drain: /readyz
    /// answers 503 so that load balancers stop sending, and each HTTP/1 answer carries
    /// `Connection: close` so that clients retire their keep-alive connections instead of
    /// having them closed under a request they are sending. 0s skips it.
    #[arg(long, env = "SLUICE_DRAIN_DELAY", default_value = "2s", value_parser = humantime::parse_duration)]
    pub drain_delay: Duration,
    /// After draining, how long to wait for the control plane to ack the last usage.
    #[arg(long, env = "SLUICE_USAGE_FLUSH_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub usage_flush_timeout: Duration,
    /// Log format on stderr: one line per event; RUST_LOG filters (default info).
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log lines held while stderr is slower than the proxy (a stalled log shipper); a thread
    /// of its own writes them in batches every 20 ms, so requests never wait on stderr. Beyond
    /// this many, lines are dropped and counted in sluice_log_dropped_lines_total.
    #[arg(long, env = "SLUICE_LOG_BUFFER_LINES", default_value_t = crate::logging::DEFAULT_BUFFER_LINES, value_parser = clap::value_parser!(usize))]
    pub log_buffer_lines: usize,
    /// This replica's own directory. The usage spool lives there (`usage-spool/`): every
    /// usage record stays on disk until the control plane acks it, so a crash (SIGKILL, OOM
    /// kill, panic) loses none and a restart on the same directory sends them again. One
    /// directory per replica: a lock refuses a second process. Unset: no spool, and a crash
    /// loses the usage the control plane has not acked yet (normally the last ~0.2 s).
    #[arg(long, env = "SLUICE_PROXY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Most bytes the usage spool keeps on disk (about 350 bytes per request). It fills only
    /// while the control plane is unreachable; then --usage-spool-full applies. A restart
    /// reads the whole spool into memory to resend it (about 400 bytes per record).
    #[arg(long, env = "SLUICE_USAGE_SPOOL_MAX_BYTES", default_value_t = crate::spool::DEFAULT_MAX_BYTES)]
    pub usage_spool_max_bytes: u64,
    /// What a request does when the usage spool is full or its disk fails: `serve` it anyway
    /// (its usage is still reported, but a crash before the ack loses it), or `refuse` it with
    /// 503 before any upstream call.
    #[arg(
        long,
        env = "SLUICE_USAGE_SPOOL_FULL",
        value_enum,
        default_value = "serve"
    )]
    pub usage_spool_full: crate::spool::OnFull,
    /// How often the usage spool is flushed to disk (fdatasync). A machine crash loses at
    /// most this much; usage is reported to the control plane once flushed, so this is also
    /// the most it adds to reporting.
    #[arg(long, env = "SLUICE_USAGE_SPOOL_SYNC_INTERVAL", default_value = "100ms", value_parser = sluice_domain::time::positive_duration)]
    pub usage_spool_sync_interval: Duration,
    /// What a request of a key with a budget does when its allowance (the share of the
    /// budget the control plane granted this replica) has run out and the control plane
    /// cannot be asked for more (unreachable, or its lease ran out): `refuse` it with 503
    /// `budget_unavailable`, or `serve` it and let the control plane count it when it is back
    /// (the key's spend may then pass its budget by what was served meanwhile).
    #[arg(
        long,
        env = "SLUICE_BUDGET_WHEN_AWAY",
        value_enum,
        default_value = "refuse"
    )]
    pub budget_when_away: crate::allowance::WhenAway,
    /// How long this replica keeps spending the allowances it holds after the last message
    /// from the control plane (which renews it every third of it while connected).
    /// From 1s to 1h: the control plane grants a cut-off replica's money again an hour after
    /// at most, and a longer lease would spend it twice.
    #[arg(long, env = "SLUICE_ALLOWANCE_LEASE", default_value = "60s", value_parser = allowance_lease)]
    pub allowance_lease: Duration,
    /// How long a request whose key's allowance ran out waits for the control plane to
    /// grant more before --budget-when-away applies. The control plane answers in about a
    /// millisecond when idle; the wait is long so that a busy one does not turn into 503s.
    #[arg(long, env = "SLUICE_ALLOWANCE_WAIT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub allowance_wait: Duration,
    /// Threads that serve HTTP; 0 means one per CPU core the process may use. Each runs its
    /// own single-threaded runtime and upstream connection pool, so a request never changes
    /// threads; each accepted connection goes to the one holding the fewest and stays there.
    #[arg(long, env = "SLUICE_SERVING_THREADS", default_value_t = 0)]
    pub serving_threads: usize,
    /// For tests: this replica's wall clock reads this much ahead (`2s`) or behind (`-2s`),
    /// as on a host whose clock is off. Only the data plane's own readings move.
    #[arg(
        long,
        env = "SLUICE_WALL_CLOCK_OFFSET",
        hide = true,
        allow_hyphen_values = true
    )]
    pub wall_clock_offset: Option<crate::clock::WallOffset>,
    /// For tests: the size at which the usage spool starts a new segment (4 MiB), so that a
    /// short test goes through many segments and the reuse of their files.
    #[arg(long, env = "SLUICE_USAGE_SPOOL_SEGMENT_BYTES", hide = true, default_value_t = crate::spool::DEFAULT_SEGMENT_BYTES)]
    pub usage_spool_segment_bytes: u64,
}

impl Config {
    /// Defaults for everything, listening on `listen`, talking to `control_plane`.
    pub fn new(control_plane: impl Into<String>, listen: SocketAddr) -> Self {
        Self {
            config: None,
            control_plane: control_plane.into(),
            control_plane_ca: None,
            upstream_ca: None,
            upstream_http2: false,
            listen,
            node_id: None,
            dataplane_token: None,
            dataplane_token_file: None,
            max_body_bytes: 16 * 1024 * 1024,
            max_response_bytes: 64 * 1024 * 1024,
            max_buffered_body_bytes: 256 * 1024 * 1024,
            max_buffered_answer_bytes: 256 * 1024 * 1024,
            max_buffered_answer_bytes_per_key: None,
            body_read_timeout: Duration::from_secs(30),
            header_read_timeout: sluice_listener::DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: sluice_listener::DEFAULT_IDLE_TIMEOUT,
            write_timeout: sluice_listener::DEFAULT_WRITE_TIMEOUT,
            stream_keepalive: crate::proxy::DEFAULT_STREAM_KEEPALIVE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            usage_queue: crate::usage::DEFAULT_CAPACITY,
            drain_timeout: Duration::from_secs(30),
            drain_delay: DEFAULT_DRAIN_DELAY,
            usage_flush_timeout: Duration::from_secs(10),
            log_format: LogFormat::Text,
            log_buffer_lines: crate::logging::DEFAULT_BUFFER_LINES,
            serving_threads: 0,
            wall_clock_offset: None,
            data_dir: None,
            usage_spool_max_bytes: crate::spool::DEFAULT_MAX_BYTES,
            usage_spool_full: crate::spool::OnFull::Serve,
            usage_spool_sync_interval: crate::spool::DEFAULT_SYNC_INTERVAL,
            usage_spool_segment_bytes: crate::spool::DEFAULT_SEGMENT_BYTES,
            budget_when_away: crate::allowance::WhenAway::Refuse,
            allowance_lease: Duration::from_secs(60),
            allowance_wait: Duration::from_secs(1),
        }
    }

    /// What the answers to one key may hold (`--max-buffered-answer-bytes-per-key`).
    pub fn answers_per_key(&self) -> usize {
        self.max_buffered_answer_bytes_per_key.unwrap_or_else(|| {
            (self.max_buffered_answer_bytes / 2)
                .max(self.max_response_bytes.saturating_mul(2))
                .min(self.max_buffered_answer_bytes)
        })
    }

    /// The allowance options.
    pub fn allowances(&self) -> crate::allowance::AllowanceOptions {
        crate::allowance::AllowanceOptions {
            lease: self
                .allowance_lease
                .clamp(*ALLOWANCE_LEASE.start(), *ALLOWANCE_LEASE.end()),
            wait: self.allowance_wait,
            when_away: self.budget_when_away,
        }
    }

    /// The spool's options, when a data directory is given.
    pub fn spool(&self) -> Option<crate::spool::SpoolOptions> {
        let dir = self.data_dir.as_ref()?;
        Some(crate::spool::SpoolOptions {
            max_bytes: self.usage_spool_max_bytes,
            on_full: self.usage_spool_full,
            sync_interval: self.usage_spool_sync_interval,
            segment_bytes: self.usage_spool_segment_bytes.max(1),
            ..crate::spool::SpoolOptions::new(dir)
        })
    }

    /// `--stream-keepalive`, `None` when off (0).
    pub fn stream_keepalive(&self) -> Option<Duration> {
        Some(self.stream_keepalive).filter(|every| !every.is_zero())
    }

    /// How many serving threads to run: the option, or one per usable CPU core.
    pub fn serving_threads(&self) -> usize {
        match self.serving_threads {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        }
    }

    /// Parses the command line, the environment and the --config file, or prints why not
    /// (or the help) and exits. With the options come the file keys the environment
    /// overrode, for `main` to log once logging is up.
    pub fn load() -> sluice_config::Parsed<Self> {
        use clap::CommandFactory;
        sluice_config::parse_from(Self::command(), "config", std::env::args_os())
            .unwrap_or_else(|e| e.exit())
    }

    /// The token from the flag or variable if given, else from the named file. A value wins,
    /// as for every secret of both servers, so that the environment overrides a file path
    /// in the --config file. An empty value counts as none (an orchestrator's unset secret
    /// often arrives as an empty variable), as on the control plane.
    pub fn token(&self) -> std::io::Result<Option<String>> {
        if let Some(token) = self.dataplane_token.as_ref().filter(|t| !t.0.is_empty()) {
            return Ok(Some(token.0.clone()));
        }
        match &self.dataplane_token_file {
            Some(path) => Ok(Some(std::fs::read_to_string(path)?.trim().to_owned())),
            None => Ok(None),
        }
    }
}

/// `--allowance-lease`: a duration within [`ALLOWANCE_LEASE`].
fn allowance_lease(text: &str) -> Result<Duration, String> {
    let lease = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if ALLOWANCE_LEASE.contains(&lease) {
        Ok(lease)
    } else {
        Err(format!(
            "must be from {} to {} (the control plane grants a cut-off replica's allowances \
             again after at most {0})",
            humantime::format_duration(*ALLOWANCE_LEASE.start()),
            humantime::format_duration(*ALLOWANCE_LEASE.end()),
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use clap::Parser;

    #[test]
    fn parses_flags_and_never_shows_the_token() {
        let config = Config::try_parse_from([
            "sluice-proxy",
            "--listen",
            "127.0.0.1:0",
            "--node-id",
            "dp-1",
            "--dataplane-token",
            "tok-very-secret",
            "--drain-timeout",
            "5s",
            "--log-format",
            "json",
        ])
        .unwrap();
        assert_eq!(config.node_id.as_deref(), Some("dp-1"));
        assert_eq!(config.drain_timeout, Duration::from_secs(5));
        assert_eq!(config.drain_delay, DEFAULT_DRAIN_DELAY);
        assert_eq!(
            Config::new("http://127.0.0.1:1", "127.0.0.1:0".parse().unwrap()).drain_delay,
            DEFAULT_DRAIN_DELAY
        );
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.max_body_bytes, 16 * 1024 * 1024);
        assert_eq!(config.token().unwrap().as_deref(), Some("tok-very-secret"));
        assert!(!format!("{config:?}").contains("tok-very-secret"));
        let bearer = crate::control::BearerToken::new(Some("tok-very-secret")).unwrap();
        assert!(!format!("{bearer:?}").contains("tok-very-secret"));
    }

    #[test]
    fn a_keys_share_of_the_answers_memory_is_half_and_room_for_the_largest_answer_growing() {
        let mut config = Config::new("http://127.0.0.1:1", "127.0.0.1:0".parse().unwrap());
        config.max_buffered_answer_bytes = 256;
        config.max_response_bytes = 64;
        assert_eq!(config.answers_per_key(), 128);
        config.max_response_bytes = 100;
        assert_eq!(config.answers_per_key(), 200);
        config.max_response_bytes = 200;
        assert_eq!(config.answers_per_key(), 256);
        config.max_buffered_answer_bytes_per_key = Some(100);
        assert_eq!(config.answers_per_key(), 100);
    }

    #[test]
    fn an_allowance_lease_past_what_the_control_plane_counts_is_refused() {
        let lease = |text: &str| {
            Config::try_parse_from(["sluice-proxy", "--allowance-lease", text])
                .map(|c| c.allowance_lease)
                .map_err(|e| e.to_string())
        };
        assert_eq!(lease("1h"), Ok(Duration::from_secs(3_600)));
        assert_eq!(lease("1s"), Ok(Duration::from_secs(1)));
        for refused in ["2h", "0s", "500ms"] {
            let error = lease(refused).unwrap_err();
            assert!(
                error.contains("--allowance-lease") && error.contains("must be from 1s to 1h"),
                "{error}"
            );
        }
    }

    #[test]
    fn serving_threads_default_to_one_per_core() {
        let mut config = Config::try_parse_from(["sluice-proxy"]).unwrap();
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(config.serving_threads(), cores);
        config.serving_threads = 3;
        assert_eq!(config.serving_threads(), 3);
        let config = Config::try_parse_from(["sluice-proxy", "--serving-threads", "1"]).unwrap();
        assert_eq!(config.serving_threads(), 1);
    }

    #[test]
    fn the_token_file_is_read_unless_a_value_is_given() {
        let dir = std::env::temp_dir().join(format!("sluice-token-{}", std::process::id()));
        std::fs::write(&dir, "from-file\n").unwrap();
        let mut config = Config::new("http://127.0.0.1:1", "127.0.0.1:0".parse().unwrap());
        config.dataplane_token_file = Some(dir.clone());
        assert_eq!(config.token().unwrap().as_deref(), Some("from-file"));
        config.dataplane_token = Some(Secret(String::new()));
        assert_eq!(
            config.token().unwrap().as_deref(),
            Some("from-file"),
            "an empty variable is none"
        );
        config.dataplane_token = Some(Secret("from-env".into()));
        assert_eq!(config.token().unwrap().as_deref(), Some("from-env"));
        std::fs::remove_file(dir).unwrap();
    }
}
