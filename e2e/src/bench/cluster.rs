//! A whole Sluice on loopback for the benchmarks: the real `sluice-control`, `sluice-proxy`
//! and `sluice-mock` processes, configured over the admin gRPC API.
//!
//! Unlike the test harness, children write their logs straight to files (`<log dir>/<name>.log`),
//! so a data plane logging one line per request costs the benchmark process nothing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use sluice_proto::v1 as pb;
use sluice_proto::v1::admin_service_client::AdminServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::BenchError;
use crate::process::{listening_addr, strip_ansi};

/// Admin token the benchmark's control plane is started with.
pub const ADMIN_TOKEN: &str = "bench-admin-token-0123456789abcdef0123456789";
/// Data-plane token the benchmark's control plane and data planes share.
pub const DATAPLANE_TOKEN: &str = "bench-dataplane-token-0123456789abcdef01234567";
/// How long a daily budget's period lasts in the benchmark's control plane (its hidden
/// `--budget-period-length`), so that the propagation rounds see a reset every second. Only
/// keys with a periodic budget notice: the benchmark's own key has none.
pub const BUDGET_PERIOD: Duration = Duration::from_secs(1);
/// How long a process may take to start listening or to become ready.
const START: Duration = Duration::from_secs(30);

/// Adds `authorization: Bearer <admin token>` to every call.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// The admin API client.
pub type Admin = AdminServiceClient<InterceptedService<Channel, Bearer>>;

/// A child process whose output goes to a log file. Killed when dropped.
pub struct Service {
    name: String,
    child: tokio::process::Child,
    log: PathBuf,
}

impl Service {
    /// Starts `bin` with `args` and `envs`, output to `log`.
    pub fn spawn(
        bin: &Path,
        args: &[String],
        envs: &[(&str, &str)],
        log: PathBuf,
    ) -> Result<Self, BenchError> {
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let child = tokio::process::Command::new(bin)
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| BenchError::Setup(format!("cannot start {}: {e}", bin.display())))?;
        let name = bin
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Self { name, child, log })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits for the `"<listener> listening on <addr>"` log line and returns the address.
    pub async fn wait_for_listening(&mut self, listener: &str) -> Result<SocketAddr, BenchError> {
        let deadline = Instant::now() + START;
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let found = log
                .lines()
                .find_map(|line| listening_addr(&strip_ansi(line), listener));
            if let Some(addr) = found {
                return Ok(addr);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(self.failure(&format!("exited ({status}) before listening")));
            }
            if Instant::now() > deadline {
                return Err(self.failure(&format!(
                    "no `{listener} listening on` line within {START:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn failure(&self, what: &str) -> BenchError {
        BenchError::Setup(format!("{} {what}; see {}", self.name, self.log.display()))
    }
}

/// A `sluice-mock` process.
pub struct MockProcess {
    pub service: Service,
    pub addr: SocketAddr,
    /// The key the mock demands (the backend's provider key).
    pub api_key: String,
}

impl MockProcess {
    /// `http://<addr>/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Replaces the mock's fault plan (`POST /_mock/faults`).
    pub async fn set_faults(
        &self,
        http: &reqwest::Client,
        plan: serde_json::Value,
    ) -> Result<(), BenchError> {
        let url = format!("http://{}/_mock/faults", self.addr);
        let response = http
            .post(url)
            .json(&plan)
            .send()
            .await
            .map_err(|e| BenchError::Setup(format!("setting mock faults: {e}")))?;
        if !response.status().is_success() {
            return Err(BenchError::Setup(format!(
                "the mock refused the fault plan: {}",
                response.status()
            )));
        }
        Ok(())
    }
}

/// A `sluice-proxy` process.
pub struct ProxyProcess {
    pub service: Service,
    pub addr: SocketAddr,
}

impl ProxyProcess {
    /// `http://<addr>/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn pid(&self) -> Option<u32> {
        self.service.pid()
    }
}

/// Where binaries are and where logs go, and the log filter of the data planes.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub bin_dir: PathBuf,
    pub log_dir: PathBuf,
    /// `RUST_LOG` of the data planes (`info` logs one line per request, as in production).
    pub proxy_log: String,
}

/// A control plane and the processes started around it. Everything stops when dropped.
pub struct Cluster {
    config: ClusterConfig,
    _dir: tempfile::TempDir,
    _control: Service,
    admin: Admin,
    grpc_url: String,
    http: reqwest::Client,
}

impl Cluster {
    /// Starts a control plane on a fresh data directory.
    pub async fn start(config: ClusterConfig) -> Result<Self, BenchError> {
        std::fs::create_dir_all(&config.log_dir)?;
        for bin in ["sluice-control", "sluice-proxy", "sluice-mock"] {
            let path = config.bin_dir.join(bin);
            if !path.is_file() {
                return Err(BenchError::Setup(format!(
                    "{} is missing: run `cargo build --release --bins` first",
                    path.display()
                )));
            }
        }
        let dir = tempfile::tempdir()?;
        let mut control = Service::spawn(
            &config.bin_dir.join("sluice-control"),
            &[
                "--data-dir".into(),
                dir.path().join("data").display().to_string(),
                "--grpc-listen".into(),
                "127.0.0.1:0".into(),
                "--http-listen".into(),
                "127.0.0.1:0".into(),
                "--budget-period-length".into(),
                humantime::format_duration(BUDGET_PERIOD).to_string(),
            ],
            &[
                ("SLUICE_ADMIN_TOKEN", ADMIN_TOKEN),
                ("SLUICE_DATAPLANE_TOKEN", DATAPLANE_TOKEN),
                ("RUST_LOG", "info"),
            ],
            config.log_dir.join("sluice-control.log"),
        )?;
        let grpc = control.wait_for_listening("grpc").await?;
        let grpc_url = format!("http://{grpc}");
        let channel = Channel::from_shared(grpc_url.clone())
            .map_err(|e| BenchError::Setup(e.to_string()))?
            .tcp_nodelay(true)
            .connect()
            .await?;
        let token = format!("Bearer {ADMIN_TOKEN}")
            .parse()
            .map_err(|_| BenchError::Setup("bad admin token".into()))?;
        let admin = AdminServiceClient::with_interceptor(channel, Bearer(token));
        // The propagation rounds tell which backend answered by `x-sluice-backend`.
        admin
            .clone()
            .update_settings(pb::UpdateSettingsRequest {
                settings: Some(pb::Settings {
                    expose_backend_header: true,
                    ..Default::default()
                }),
                update_mask: Some(sluice_proto::wkt::FieldMask {
                    paths: vec!["expose_backend_header".into()],
                }),
            })
            .await?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| BenchError::Setup(e.to_string()))?;
        Ok(Self {
            config,
            _dir: dir,
            _control: control,
            admin,
            grpc_url,
            http,
        })
    }

    /// A client of the admin API (cheap to clone).
    pub fn admin(&self) -> Admin {
        self.admin.clone()
    }

    /// A plain HTTP client for setup calls (not for measured load).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Starts a mock provider named `name` demanding a key, with extra flags.
    pub async fn mock(&self, name: &str, extra: &[&str]) -> Result<MockProcess, BenchError> {
        let api_key = format!("sk-bench-upstream-{name}");
        let mut args = vec![
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--name".to_owned(),
            name.to_owned(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut service = Service::spawn(
            &self.config.bin_dir.join("sluice-mock"),
            &args,
            &[
                ("SLUICE_MOCK_API_KEY", api_key.as_str()),
                ("RUST_LOG", "warn,sluice_mock=info"),
            ],
            self.config.log_dir.join(format!("mock-{name}.log")),
        )?;
        let addr = service.wait_for_listening("http").await?;
        Ok(MockProcess {
            service,
            addr,
            api_key,
        })
    }

    /// Starts a data plane named `node_id` and waits until it holds a snapshot.
    pub async fn proxy(&self, node_id: &str) -> Result<ProxyProcess, BenchError> {
        let mut service = Service::spawn(
            &self.config.bin_dir.join("sluice-proxy"),
            &[
                "--control-plane".into(),
                self.grpc_url.clone(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--node-id".into(),
                node_id.into(),
            ],
            &[
                ("SLUICE_DATAPLANE_TOKEN", DATAPLANE_TOKEN),
                ("RUST_LOG", self.config.proxy_log.as_str()),
            ],
            self.config.log_dir.join(format!("proxy-{node_id}.log")),
        )?;
        let addr = service.wait_for_listening("http").await?;
        let deadline = Instant::now() + START;
        loop {
            let ready = self
                .http
                .get(format!("http://{addr}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(ProxyProcess { service, addr });
            }
            if Instant::now() > deadline {
                return Err(service.failure("never became ready"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Registers `mock` as a primary backend serving `models` (same name upstream).
    pub async fn add_backend(
        &self,
        name: &str,
        mock: &MockProcess,
        priority: i32,
        models: &[&str],
    ) -> Result<pb::Backend, BenchError> {
        let response = self
            .admin()
            .create_backend(pb::CreateBackendRequest {
                backend: Some(pb::Backend {
                    name: name.into(),
                    base_url: mock.base_url(),
                    pool: pb::Pool::Primary as i32,
                    priority,
                    weight: 1,
                    enabled: true,
                    models: model_routes(models),
                    ..Default::default()
                }),
                api_key: mock.api_key.clone(),
            })
            .await?;
        response
            .into_inner()
            .backend
            .ok_or_else(|| BenchError::Setup("CreateBackend returned no backend".into()))
    }

    /// Replaces the models `backend` serves.
    pub async fn set_models(&self, backend_id: &str, models: &[&str]) -> Result<(), BenchError> {
        self.admin()
            .update_backend(pb::UpdateBackendRequest {
                backend: Some(pb::Backend {
                    id: backend_id.into(),
                    models: model_routes(models),
                    ..Default::default()
                }),
                update_mask: Some(sluice_proto::wkt::FieldMask {
                    paths: vec!["models".into()],
                }),
                api_key: String::new(),
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    /// Clears the cooldown of `backend_id` everywhere.
    pub async fn reset_cooldown(&self, backend_id: &str) -> Result<(), BenchError> {
        self.admin()
            .reset_cooldown(pb::ResetCooldownRequest {
                model: String::new(),
                backend_id: backend_id.into(),
            })
            .await?;
        Ok(())
    }

    /// Creates a client key for every model and returns its plaintext.
    pub async fn create_key(&self, name: &str) -> Result<String, BenchError> {
        let response = self
            .admin()
            .create_client_key(pb::CreateClientKeyRequest {
                name: name.into(),
                allowed_models: Vec::new(),
                rpm_limit: 0,
                expire_time: None,
                ..Default::default()
            })
            .await?;
        Ok(response.into_inner().key)
    }
}

fn model_routes(models: &[&str]) -> Vec<pb::ModelRoute> {
    models
        .iter()
        .map(|m| pb::ModelRoute {
            name: (*m).into(),
            upstream_name: (*m).into(),
            input_price_per_mtok: 1.0,
            output_price_per_mtok: 2.0,
            default_max_tokens: 0,
            max_output_tokens: 0,
            ..Default::default()
        })
        .collect()
}
