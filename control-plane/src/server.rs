//! Wires the store, the metrics, the snapshot publisher and the services, and serves
//! gRPC and HTTP until told to stop. Wiring only: each part lives in its own module.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sluice_listener::{Acceptor, Http};
use sluice_proto::limits;
use sluice_proto::v1::admin_service_server::AdminServiceServer;
use sluice_proto::v1::stats_service_server::StatsServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Identity, ServerTlsConfig};

use crate::api::admin::Admin;
use crate::api::auth::TokenCheck;
use crate::api::dataplane::{DataPlaneApi, DataPlaneRoutes};
use crate::api::stats::Stats;
use crate::membership::{self, Membership, Registry};
use crate::metrics::{GrpcMetricsLayer, Metrics};
use crate::secrets::{SecretSources, SecretsError};
use crate::snapshot::Publisher;
use crate::store::{DB_FILE, Opened, Store, StoreError};

/// The data directory's lock file, locked while a control plane runs on it (and while any
/// handle on its store lives): offline commands that must not run beside one
/// ([`crate::master_key::rotate`]) take it too.
pub const LOCK_FILE: &str = "lock";

/// How the control plane runs.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub secrets: SecretSources,
    pub tls: Option<TlsFiles>,
    pub http: HttpOptions,
    pub grpc: GrpcOptions,
}

/// How the gRPC listener treats its connections (see [`crate::grpc_incoming`]).
#[derive(Debug, Clone)]
pub struct GrpcOptions {
    /// Connections open at once; past it a new one is refused (GOAWAY) and closed.
    pub max_connections: usize,
    /// A connection that has made no request with a token within this (and a second's
    /// grace) is closed (with TLS, its handshake has as long).
    pub first_request_timeout: Duration,
}

/// The default for `--grpc-max-connections`: each data plane holds two, each admin tool one.
pub const DEFAULT_GRPC_MAX_CONNECTIONS: usize = 1_000;

/// The default for `--grpc-first-request-timeout`.
pub const DEFAULT_GRPC_FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for GrpcOptions {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_GRPC_MAX_CONNECTIONS,
            first_request_timeout: DEFAULT_GRPC_FIRST_REQUEST_TIMEOUT,
        }
    }
}

/// How the HTTP listener treats its clients.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Host names answered besides IP addresses and `localhost` (`*`: any); see
    /// [`crate::http::host`].
    pub allowed_hosts: Vec<String>,
    /// A connection that has not sent a whole request head within this is closed.
    pub header_read_timeout: Duration,
    /// A kept-alive HTTP/1 connection idle (no byte of a next request) this long is closed.
    pub idle_timeout: Duration,
    /// A connection whose client accepts none of an answer for this long is closed.
    pub write_timeout: Duration,
    /// Connections open at once; past it a new one gets 503 and is closed.
    pub max_connections: usize,
}

/// The default for `--http-max-connections`: the dashboard, its API and scrapers need few.
pub const DEFAULT_HTTP_MAX_CONNECTIONS: usize = 1_000;

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            allowed_hosts: Vec::new(),
            header_read_timeout: sluice_listener::DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: sluice_listener::DEFAULT_IDLE_TIMEOUT,
            write_timeout: sluice_listener::DEFAULT_WRITE_TIMEOUT,
            max_connections: DEFAULT_HTTP_MAX_CONNECTIONS,
        }
    }
}

/// PEM files for the gRPC listener's TLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Why the control plane could not start or failed while running.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data directory {0} is in use by another sluice-control process")]
    Locked(PathBuf),
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("gRPC reflection: {0}")]
    Reflection(String),
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

/// How long a stopping control plane waits for its connections to close, once it has ended
/// the replicas' streams and stopped accepting. Requests in progress finish well within it;
/// what is still open after it is a peer that no longer answers (a frozen or partitioned
/// replica, a half-open connection, a client that does not acknowledge the HTTP/2 shutdown),
/// which would otherwise hold the stop until the connection's keep-alive gave up (about 30 s,
/// past Kubernetes' default grace period and its SIGKILL).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// `serving` (a listener's server), given at most [`SHUTDOWN_GRACE`] after `stop` to finish;
/// past it, `cut_short` stands for its result, and the connections it still held close with
/// the process.
async fn within_grace<T>(
    serving: impl std::future::Future<Output = T>,
    stop: CancellationToken,
    listener: &'static str,
    cut_short: T,
) -> T {
    tokio::pin!(serving);
    let grace_over = async {
        stop.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        done = &mut serving => done,
        () = grace_over => {
            tracing::warn!(
                listener,
                grace = ?SHUTDOWN_GRACE,
                "connections still open after the shutdown grace: closing them"
            );
            cut_short
        }
    }
}

/// A started control plane. Dropping it does not stop it; call [`Running::shutdown`].
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub admin_token: String,
    pub dataplane_token: String,
    pub store: Store,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl Running {
    /// Stops accepting, ends replica streams, and waits for the servers and background
    /// writers to finish. The data directory stays locked until the last handle on the store
    /// is gone (a write still queued included: `Store::hold_lock`).
    pub async fn shutdown(self) -> Result<(), ServeError> {
        self.stop.cancel();
        self.wait().await
    }

    /// Waits until the servers stop (after a shutdown, or on a fatal error).
    pub async fn wait(self) -> Result<(), ServeError> {
        match self.task.await {
            Ok(result) => result,
            Err(_) => Ok(()),
        }
    }

    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }
}

/// Makes `dir` readable by this user only (0700) when others may read it. A directory this
/// user may write but not chmod (a Kubernetes volume's root, owned by root and given to the
/// pod's group through `fsGroup`) is used as it is, with a warning: refusing it left the
/// control plane crash-looping on a volume it could use. Its secrets are files of mode 0600
/// either way.
#[cfg(unix)]
fn private_to_this_user(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    match std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
        Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => {
            tracing::warn!(
                path = %dir.display(),
                mode = %format!("{mode:o}"),
                "the data directory is not this user's to make private (owned by another user, as a volume's root given through a group): used as it is"
            );
            Ok(())
        }
        result => result,
    }
}

/// Streams one HTTP/2 connection to the gRPC port may have open at once.
const GRPC_MAX_STREAMS_PER_CONNECTION: u32 = 100;

/// Opens the data directory and database, binds both listeners and starts serving.
pub async fn start(config: Config) -> Result<Running, ServeError> {
    let dir_err = |source| ServeError::DataDir {
        path: config.data_dir.clone(),
        source,
    };
    std::fs::create_dir_all(&config.data_dir).map_err(dir_err)?;
    #[cfg(unix)]
    private_to_this_user(&config.data_dir).map_err(dir_err)?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(config.data_dir.join(LOCK_FILE))
        .map_err(dir_err)?;
    if lock.try_lock().is_err() {
        return Err(ServeError::Locked(config.data_dir.clone()));
    }

    // The TLS files read and the ports bound before the database is opened: an upgrade that
    // fails on either has not migrated the database (which the older binary then refuses).
    // Connections wait in the accept queue while a migration runs.
    let tls = match &config.tls {
        Some(files) => {
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|e| ServeError::Tls(format!("{}: {e}", p.display())))
            };
            Some(
                ServerTlsConfig::new()
                    .identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?))
                    .timeout(config.grpc.first_request_timeout),
            )
        }
        None => None,
    };

    let grpc_listener = TcpListener::bind(config.grpc_listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.grpc_listen,
            source,
        })?;
    let http_listener = TcpListener::bind(config.http_listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.http_listen,
            source,
        })?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|source| ServeError::Bind {
            addr: config.grpc_listen,
            source,
        })?;
    let http_addr = http_listener
        .local_addr()
        .map_err(|source| ServeError::Bind {
            addr: config.http_listen,
            source,
        })?;

    let db_path = config.data_dir.join(DB_FILE);
    let existing_db = db_path.exists().then_some(db_path.as_path());
    let secrets = crate::secrets::resolve(&config.data_dir, &config.secrets, existing_db)?;
    let metrics = Arc::new(Metrics::new());
    let staged_key = config
        .data_dir
        .join(format!("{}.new", crate::secrets::MASTER_KEY_FILE));
    let (store, opened) = match Store::open_observed(
        &db_path,
        secrets.master_key,
        Arc::clone(&metrics) as _,
    ) {
        Err(StoreError::WrongMasterKey) if staged_key.exists() => {
            tracing::error!(
                "{} is in the data directory: a master-key rotation stopped before it finished; run `sluice-control rotate-master-key` to finish it",
                staged_key.display()
            );
            return Err(StoreError::WrongMasterKey.into());
        }
        opened => opened?,
    };
    // Unlocked only once no write can come any more: see `Store::hold_lock`.
    store.hold_lock(lock);
    if opened == Opened::Created {
        tracing::info!(path = %db_path.display(), "created a new database");
    }

    // Replicas connected when the control plane stopped are still serving on their shares.
    membership::resume(&store, crate::time::now_ms()).await?;
    let publisher = Publisher::start(store.clone()).await?;
    let registry = Arc::new(Registry::default());
    let members = Membership::new(store.clone(), Arc::clone(&registry));
    let stop = CancellationToken::new();
    // Background writers: awaited on shutdown, so none writes after the data directory is
    // unlocked (another process may then open the database, e.g. to rotate the master key).
    let background = [
        tokio::spawn(store.clone().run_usage_retention(stop.clone())),
        tokio::spawn(membership::expire_shares(members.clone(), stop.clone())),
        tokio::spawn(crate::expiry::publish_key_expiries(
            store.clone(),
            stop.clone(),
        )),
        tokio::spawn(crate::budget_resets::publish_budget_resets(
            store.clone(),
            stop.clone(),
        )),
    ];

    let waiting = crate::grpc_incoming::Waiting::default();
    let admin_check =
        TokenCheck::new(&secrets.admin_token, "admin").marking_started(waiting.clone());
    let dataplane_check =
        TokenCheck::new(&secrets.dataplane_token, "data-plane").marking_started(waiting.clone());
    let dataplane = DataPlaneApi::new(store.clone(), publisher.clone(), members, stop.clone());
    let admin = Admin::new(store.clone(), publisher.clone(), registry.clone())
        .with_allowances(dataplane.allowances());
    let stats = Stats::new(store.clone());
    // A JSON API body is a few hundred bytes: the head's timeout is ample for it too.
    let json_api = crate::dashboard::JsonApi::new(
        admin.clone(),
        stats.clone(),
        admin_check.clone(),
        config.http.header_read_timeout,
    );

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AdminServiceServer<Admin>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sluice_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;

    // tonic leaves HTTP/2's limits off that hyper has on by default: a client of this port
    // (health and reflection need no token) could open streams without number, or reset
    // them as fast as it opens them. hyper's own defaults, but for the streams: a data plane
    // needs two, sluicectl one.
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(Some(GRPC_MAX_STREAMS_PER_CONNECTION))
        .http2_max_pending_accept_reset_streams(Some(20))
        .http2_max_local_error_reset_streams(Some(1024))
        .http2_max_header_list_size(Some(16 * 1024));
    let mut grpc_acceptor = Acceptor::new(
        grpc_listener,
        config.grpc.max_connections,
        metrics.grpc_connections_refused(),
    );
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .map_err(|e| ServeError::Tls(e.to_string()))?;
        grpc_acceptor = grpc_acceptor.refusing_with(b"");
    } else {
        grpc_acceptor = grpc_acceptor.refusing_with(&crate::grpc_incoming::REFUSAL);
    }
    let grpc = builder
        .layer(GrpcMetricsLayer::new(Arc::clone(&metrics)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(InterceptedService::new(
            AdminServiceServer::new(admin)
                .max_decoding_message_size(limits::MAX_ADMIN_REQUEST_BYTES)
                .max_encoding_message_size(limits::MAX_ADMIN_RESPONSE_BYTES),
            admin_check.clone(),
        ))
        .add_service(InterceptedService::new(
            StatsServiceServer::new(stats)
                .max_decoding_message_size(limits::MAX_ADMIN_REQUEST_BYTES)
                .max_encoding_message_size(limits::MAX_ADMIN_RESPONSE_BYTES),
            admin_check,
        ))
        .add_service(InterceptedService::new(
            // Usage reports are the largest messages a data plane sends, snapshots the
            // largest it receives; one decoding limit for both methods (a snapshot stream's
            // messages are far smaller: `MAX_SNAPSHOT_ACK_BYTES`).
            DataPlaneRoutes::new(
                dataplane,
                limits::MAX_USAGE_REPORT_BYTES,
                limits::MAX_SNAPSHOT_BYTES,
            ),
            dataplane_check,
        ))
        .serve_with_incoming_shutdown(
            crate::grpc_incoming::connections(
                grpc_acceptor,
                config.grpc.first_request_timeout,
                waiting,
            ),
            stop.clone().cancelled_owned(),
        );

    let http_acceptor = Acceptor::new(
        http_listener,
        config.http.max_connections,
        metrics.http_connections_refused(),
    );
    let write_timeouts = metrics.http_write_timeouts();
    let http = crate::http::router(
        publisher.clone(),
        registry.clone(),
        metrics,
        json_api,
        crate::http::host::AllowedHosts::new(&config.http.allowed_hosts),
    );
    let http = crate::http::serve(
        http_acceptor,
        http,
        // HTTP/1.1 only: nothing that reaches the dashboard or /metrics speaks h2c, and an h2
        // client could hold 200 answers a connection there for good (no window granted).
        Http::new(
            config.http.header_read_timeout,
            config.http.idle_timeout,
            config.http.write_timeout,
            write_timeouts,
        )
        .http1_only(),
        stop.clone(),
    );

    tracing::info!("grpc listening on {grpc_addr}");
    tracing::info!("http listening on {http_addr}");
    let stop_background = stop.clone();
    let grpc = within_grace(grpc, stop.clone(), "grpc", Ok(()));
    let http = within_grace(http, stop.clone(), "http", ());
    let task = tokio::spawn(async move {
        let (grpc, ()) = tokio::join!(grpc, http);
        // The servers may also end on a fatal error: stop the background writers either way.
        stop_background.cancel();
        for writer in background {
            let _ = writer.await;
        }
        grpc?;
        Ok(())
    });
    Ok(Running {
        grpc_addr,
        http_addr,
        admin_token: secrets.admin_token,
        dataplane_token: secrets.dataplane_token,
        store,
        stop,
        task,
    })
}
