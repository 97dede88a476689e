//! A control plane for other crates' tests: real gRPC on 127.0.0.1 with an
//! ephemeral port, a database in the directory the test gives, fixed tokens.

use std::path::Path;

use sluice_proto::v1::admin_service_client::AdminServiceClient;
use sluice_proto::v1::data_plane_service_client::DataPlaneServiceClient;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::secrets::SecretSources;
use crate::server::{Config, GrpcOptions, HttpOptions, Running, start};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub type AdminClient = AdminServiceClient<InterceptedService<Channel, Bearer>>;
pub type DataPlaneClient = DataPlaneServiceClient<InterceptedService<Channel, Bearer>>;

/// A running control plane; shuts down when dropped.
pub struct TestControlPlane {
    /// e.g. `http://127.0.0.1:41234`
    pub grpc_url: String,
    pub http_url: String,
    pub admin_token: String,
    pub dataplane_token: String,
    data_dir: std::path::PathBuf,
    running: Option<Running>,
}

impl TestControlPlane {
    pub async fn start(data_dir: &Path) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Self::start_with(data_dir, HttpOptions::default(), GrpcOptions::default()).await
    }

    /// [`TestControlPlane::start`] with its HTTP listener's options.
    pub async fn start_with_http(
        data_dir: &Path,
        http: HttpOptions,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Self::start_with(data_dir, http, GrpcOptions::default()).await
    }

    /// [`TestControlPlane::start`] with its gRPC listener's options.
    pub async fn start_with_grpc(
        data_dir: &Path,
        grpc: GrpcOptions,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Self::start_with(data_dir, HttpOptions::default(), grpc).await
    }

    async fn start_with(
        data_dir: &Path,
        http: HttpOptions,
        grpc: GrpcOptions,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let localhost = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let running = start(Config {
            data_dir: data_dir.to_owned(),
            grpc_listen: localhost,
            http_listen: localhost,
            secrets: SecretSources {
                admin_token: Some("test-admin-token-0123456789abcdef0123456789".into()),
                dataplane_token: Some("test-dataplane-token-0123456789abcdef01234567".into()),
                ..Default::default()
            },
            tls: None,
            http,
            grpc,
        })
        .await?;
        Ok(Self {
            grpc_url: format!("http://{}", running.grpc_addr),
            http_url: format!("http://{}", running.http_addr),
            admin_token: running.admin_token.clone(),
            dataplane_token: running.dataplane_token.clone(),
            data_dir: data_dir.to_owned(),
            running: Some(running),
        })
    }

    /// A client of its admin API, with the admin token.
    pub async fn admin_client(&self) -> Result<AdminClient, BoxError> {
        let channel = self.channel().await?;
        Ok(AdminServiceClient::with_interceptor(
            channel,
            Bearer(self.admin_token.clone()),
        ))
    }

    /// A client of its data-plane API, with the data-plane token.
    pub async fn data_plane_client(&self) -> Result<DataPlaneClient, BoxError> {
        let channel = self.channel().await?;
        Ok(DataPlaneServiceClient::with_interceptor(
            channel,
            Bearer(self.dataplane_token.clone()),
        ))
    }

    async fn channel(&self) -> Result<Channel, BoxError> {
        Ok(Channel::from_shared(self.grpc_url.clone())?
            .connect()
            .await?)
    }

    /// Stops it and waits until it has stopped and its data directory is unlocked. The
    /// directory stays locked while any handle on the store lives (`Store::hold_lock`), and a
    /// connection a test's client still holds open can outlive the servers by a moment, with
    /// the services' handles: a control plane started on the directory at once was refused
    /// (`Locked`), now and then. Panics when the directory is still locked after 10 s: the
    /// test itself holds a handle on the store (drop its clones first).
    pub async fn shutdown(mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.shutdown().await;
        }
        let lock = self.data_dir.join(crate::server::LOCK_FILE);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline {
            // Taken, the lock is let go at once (the file is closed).
            let unlocked = std::fs::OpenOptions::new()
                .write(true)
                .open(&lock)
                .is_ok_and(|file| file.try_lock().is_ok());
            if unlocked {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!(
            "the data directory {} is still locked 10 s after its control plane stopped: \
             something holds a handle on its store",
            self.data_dir.display()
        );
    }

    pub fn store(&self) -> Option<&crate::store::Store> {
        self.running.as_ref().map(|r| &r.store)
    }
}

impl Drop for TestControlPlane {
    fn drop(&mut self) {
        if let Some(running) = &self.running {
            running.stop_token().cancel();
        }
    }
}

/// A gRPC client interceptor that sends `authorization: Bearer <token>` with every call.
#[derive(Clone)]
pub struct Bearer(pub String);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let value = format!("Bearer {}", self.0)
            .parse()
            .map_err(|_| tonic::Status::invalid_argument("the token is not ASCII"))?;
        req.metadata_mut().insert("authorization", value);
        Ok(req)
    }
}

/// The samples of a Prometheus text exposition, keyed by everything before the value
/// (`name{labels}`), for tests that read `/metrics`.
pub fn metric_samples(text: &str) -> std::collections::HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Adds client keys straight into the database file at `db`, in one transaction, while no
/// control plane has it open: key `k` of `count` has the plaintext `plaintext(k)` and the name
/// `name(k)`, may use `model-0` to `model-2`, at 6,000 RPM. Provisioning a hundred thousand
/// keys through the API would take minutes.
pub fn insert_client_keys(
    db: &Path,
    count: usize,
    name: impl Fn(usize) -> String,
    plaintext: impl Fn(usize) -> String,
) -> rusqlite::Result<()> {
    let mut conn = rusqlite::Connection::open(db)?;
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare(
            "INSERT INTO client_keys (id, name, key_prefix, key_sha256, allowed_models, rpm_limit, create_time)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        for k in 0..count {
            let plaintext = plaintext(k);
            insert.execute(rusqlite::params![
                format!("0197a5c2-7f3e-7000-8000-{k:012}"),
                name(k),
                crate::client_key::shown_prefix(&plaintext),
                crate::client_key::hash(&plaintext),
                r#"["model-0","model-1","model-2"]"#,
                6000,
                1_764_000_000_000i64,
            ])?;
        }
    }
    tx.execute(
        "UPDATE meta SET value = value + 1 WHERE key = 'snapshot_version'",
        [],
    )?;
    tx.commit()
}
