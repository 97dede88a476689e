//! Wiring: the HTTP listener, the snapshot subscriber, the usage reporter, and the graceful
//! shutdown that drains requests and flushes usage in that order.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::control::{self, ControlError, NodeIdentity};
use crate::proxy::{self, AppState, Limits};
use crate::snapshot::SnapshotStore;
use crate::subscribe;
use crate::usage::{UsageReporter, UsageSink};

/// Longest wait for stream relays to record their usage after the server stopped.
const RELAY_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read the data-plane token file: {0}")]
    TokenFile(std::io::Error),
    #[error("cannot read the control plane CA file: {0}")]
    CaFile(std::io::Error),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("http server failed: {0}")]
    Serve(std::io::Error),
}

/// A bound, not yet serving data plane.
pub struct Proxy {
    listener: TcpListener,
    local_addr: SocketAddr,
    config: Config,
    token: Option<String>,
    ca_pem: Option<Vec<u8>>,
    store: Arc<SnapshotStore>,
    usage: UsageSink,
    identity: NodeIdentity,
}

impl Proxy {
    /// Binds the HTTP listener and logs `http listening on <addr>`.
    pub async fn bind(config: Config) -> Result<Self, RunError> {
        let token = config.token().map_err(RunError::TokenFile)?;
        let ca_pem = match &config.control_plane_ca {
            Some(path) => Some(std::fs::read(path).map_err(RunError::CaFile)?),
            None => None,
        };
        // Fail on a bad URL, token or CA now rather than in a retry loop.
        control::connect_with_ca(&config.control_plane, token.as_deref(), ca_pem.as_deref())?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| RunError::Bind {
                addr: config.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| RunError::Bind {
            addr: config.listen,
            source,
        })?;
        tracing::info!("http listening on {local_addr}");
        let identity = NodeIdentity::new(config.node_id.clone());
        tracing::info!(node_id = %identity.node_id, incarnation = %identity.incarnation, control_plane = %config.control_plane, "data plane starting");
        if crate::upstream::egress_proxy_from_env() {
            // The proxy's address is not logged: it may carry credentials.
            tracing::info!(
                "upstream calls go through the egress proxy named by HTTPS_PROXY / HTTP_PROXY / ALL_PROXY (NO_PROXY applies)"
            );
        }
        Ok(Self {
            listener,
            local_addr,
            usage: UsageSink::new(config.usage_queue),
            store: Arc::new(SnapshotStore::default()),
            token,
            ca_pem,
            identity,
            config,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The snapshot store (tests watch it for versions).
    pub fn store(&self) -> Arc<SnapshotStore> {
        Arc::clone(&self.store)
    }

    /// The usage queue (tests read its counters).
    pub fn usage(&self) -> UsageSink {
        self.usage.clone()
    }

    pub fn identity(&self) -> &NodeIdentity {
        &self.identity
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight requests and
    /// streams finish (up to the drain timeout), and flushes usage (up to its timeout).
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), RunError> {
        let Self {
            listener,
            config,
            token,
            ca_pem,
            store,
            usage,
            identity,
            ..
        } = self;
        let client =
            control::connect_with_ca(&config.control_plane, token.as_deref(), ca_pem.as_deref())?;

        let stop_snapshots = CancellationToken::new();
        let subscriber = tokio::spawn(subscribe::run(
            client.clone(),
            identity.clone(),
            Backoff::default(),
            {
                let store = Arc::clone(&store);
                move |snapshot| {
                    let version = snapshot.version;
                    match store.apply(snapshot) {
                        Ok(applied) => {
                            tracing::info!(version, ?applied, "snapshot applied");
                            Ok(())
                        }
                        Err(e) => Err(e.to_string()),
                    }
                }
            },
            stop_snapshots.clone(),
        ));
        let stop_usage = CancellationToken::new();
        let cooldowns = Arc::clone(store.cooldowns());
        let reporter = tokio::spawn(
            UsageReporter::new(usage.clone(), client, identity)
                .resend_events_with(Box::new(move || {
                    cooldowns.unacknowledged_events(std::time::SystemTime::now())
                }))
                .run(stop_usage.clone()),
        );

        let tasks = TaskTracker::new();
        let app = Arc::new(AppState {
            store,
            usage: usage.clone(),
            limits: Limits {
                max_body_bytes: config.max_body_bytes,
                max_response_bytes: config.max_response_bytes,
            },
            tasks: tasks.clone(),
            metrics: Arc::default(),
        });
        let draining = CancellationToken::new();
        // Without TCP_NODELAY the first SSE event waits behind the response head for the
        // client's delayed ACK (up to 40 ms on Linux): the TTFT tail the benchmark showed.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            if let Err(err) = tcp.set_nodelay(true) {
                tracing::debug!(error = %err, "TCP_NODELAY not set");
            }
        });
        let server = axum::serve(listener, proxy::router(app)).with_graceful_shutdown({
            let draining = draining.clone();
            async move { draining.cancelled().await }
        });
        let mut server = Box::pin(server.into_future());
        let served = tokio::select! {
            result = &mut server => result,
            () = shutdown => {
                tracing::info!(drain_timeout = ?config.drain_timeout, "shutting down: draining in-flight requests");
                draining.cancel();
                match tokio::time::timeout(config.drain_timeout, &mut server).await {
                    Ok(result) => result,
                    Err(_) => {
                        tracing::warn!("drain timeout passed: closing the remaining connections");
                        Ok(())
                    }
                }
            }
        };
        // Dropping the server closes whatever connections are left; their relays then
        // record the cancellation.
        drop(server);
        tasks.close();
        if tokio::time::timeout(RELAY_WAIT, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("stream relays did not finish in time");
        }
        stop_snapshots.cancel();
        let _ = subscriber.await;
        stop_usage.cancel();
        match tokio::time::timeout(config.usage_flush_timeout, reporter).await {
            Ok(_) => tracing::info!(acked = usage.acked(), "usage flushed"),
            Err(_) => tracing::warn!(
                unsent = usage.pending(),
                "usage flush timed out: unacked records are lost"
            ),
        }
        served.map_err(RunError::Serve)
    }
}

/// Binds and serves until `shutdown`.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    Proxy::bind(config).await?.serve(shutdown).await
}
