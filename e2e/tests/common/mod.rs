//! A whole Sluice on loopback for end-to-end tests: the real `sluice-control`,
//! `sluice-proxy` and `sluice-mock` binaries as child processes, an admin gRPC
//! client, and helpers to speak OpenAI HTTP to the proxy.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

pub use sluice_control::testing::Bearer;
use sluice_e2e::mock::{FaultSpec, MockStats};
use sluice_e2e::process::{Child, spawn, workspace_bin};
use sluice_proto::v1 as pb;
use sluice_proto::v1::admin_service_client::AdminServiceClient;
use sluice_proto::v1::data_plane_service_client::DataPlaneServiceClient;
use sluice_proto::v1::stats_service_client::StatsServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub const ADMIN_TOKEN: &str = "e2e-admin-token-0123456789abcdef0123456789";
pub const DATAPLANE_TOKEN: &str = "e2e-dataplane-token-0123456789abcdef01234567";
const START: Duration = Duration::from_secs(30);

pub type Admin = AdminServiceClient<InterceptedService<Channel, Bearer>>;
pub type Stats = StatsServiceClient<InterceptedService<Channel, Bearer>>;

/// A free loopback port for a process that must be restartable on the same port. Drawn
/// below the kernel's ephemeral range (32768+), where outgoing connections of parallel tests
/// would otherwise take it between this check and the child's bind; and never twice in one
/// test process, whose tests run in parallel: two of them drew the same port before either
/// child had bound it (a replica then failed to start with "Address already in use").
pub fn free_port() -> u16 {
    loop {
        let port = rand::random_range(20_000..32_000);
        if reserve(port) {
            return port;
        }
    }
}

/// Takes `port` for this test process if no test here has it and it is free now.
fn reserve(port: u16) -> bool {
    static TAKEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut taken = TAKEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    !taken.contains(&port)
        && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        && taken.insert(port)
}

/// The control plane's admin and stats APIs at a gRPC URL.
pub struct ControlApi {
    pub url: String,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub grpc_port: u16,
    control: Option<Child>,
    /// The control plane's HTTP listener (`/metrics`, the dashboard), once started.
    pub http_addr: Option<SocketAddr>,
    /// Flags every start of the control plane gets besides the usual ones.
    control_args: Vec<String>,
    api: ControlApi,
}

impl std::ops::Deref for Cluster {
    type Target = ControlApi;
    fn deref(&self) -> &ControlApi {
        &self.api
    }
}

impl Cluster {
    /// The set-up most tests start from: a control plane, a mock `a` serving model `m` as
    /// the one primary backend (`m` → `m`), and a client key `k` for every model.
    pub async fn with_one_backend() -> (Self, Mock, String) {
        let cluster = Self::start().await;
        let mock = Mock::start("a", &["m"]).await;
        cluster
            .add_backend("a", &mock, pb::Pool::Primary, 0, &[("m", "m")])
            .await;
        let (_, key) = cluster.create_key("k", &[]).await;
        (cluster, mock, key)
    }

    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// A control plane started (and restarted) with `extra` flags.
    pub async fn start_with(extra: &[&str]) -> Self {
        let grpc_port = free_port();
        let mut cluster = Self {
            dir: tempfile::tempdir().unwrap(),
            grpc_port,
            control: None,
            http_addr: None,
            control_args: extra.iter().map(|s| s.to_string()).collect(),
            api: ControlApi {
                url: format!("http://127.0.0.1:{grpc_port}"),
            },
        };
        cluster.start_control().await;
        cluster
    }

    pub fn control_url(&self) -> String {
        self.api.url.clone()
    }

    /// The running control plane's process (its output, for tests that read its log).
    pub fn control(&self) -> &Child {
        self.control.as_ref().expect("control plane running")
    }

    pub async fn start_control(&mut self) {
        assert!(self.control.is_none(), "control plane already running");
        let mut args = vec![
            "--data-dir".to_owned(),
            self.dir.path().join("data").display().to_string(),
            "--grpc-listen".to_owned(),
            format!("127.0.0.1:{}", self.grpc_port),
            "--http-listen".to_owned(),
            "127.0.0.1:0".to_owned(),
        ];
        args.extend(self.control_args.iter().cloned());
        let child = spawn(
            workspace_bin("sluice-control"),
            args,
            [
                ("SLUICE_ADMIN_TOKEN", ADMIN_TOKEN),
                ("SLUICE_DATAPLANE_TOKEN", DATAPLANE_TOKEN),
                ("RUST_LOG", "info"),
            ],
        )
        .unwrap();
        child.wait_for_listening("grpc", START).await.unwrap();
        self.http_addr = Some(child.wait_for_listening("http", START).await.unwrap());
        self.control = Some(child);
    }

    /// Every line the running control plane has logged.
    pub fn control_output(&self) -> Vec<String> {
        self.control.as_ref().map(Child::output).unwrap_or_default()
    }

    /// The control plane's `/metrics`, as samples keyed by `name{labels}`.
    pub async fn control_metrics(&self) -> std::collections::HashMap<String, f64> {
        let addr = self.http_addr.expect("control plane running");
        let text = http_client()
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        sluice_control::testing::metric_samples(&text)
    }

    /// SIGTERM, and waits for a clean exit.
    pub async fn stop_control(&mut self) {
        let mut child = self.control.take().expect("control plane running");
        self.http_addr = None;
        child.terminate().await.unwrap();
        let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
            .await
            .expect("control plane stops within 15 s of SIGTERM")
            .unwrap();
        assert!(status.success(), "control plane exit status {status}");
    }

    /// SIGKILL: no chance to clean up.
    pub async fn kill_control(&mut self) {
        let mut child = self.control.take().expect("control plane running");
        self.http_addr = None;
        child.kill().await.unwrap();
    }

    /// Starts a data plane and waits until it is ready (holds a snapshot).
    pub async fn proxy(&self) -> Proxy {
        self.proxy_with(&[]).await
    }

    pub async fn proxy_with(&self, extra: &[&str]) -> Proxy {
        self.proxy_with_env(extra, &[]).await
    }

    /// A data plane with extra flags and environment variables.
    pub async fn proxy_with_env(&self, extra: &[&str], env: &[(&str, &str)]) -> Proxy {
        self.proxy_via(&self.control_url(), extra, env).await
    }

    /// A data plane started through `prefix` (a command that runs the rest of its
    /// arguments, such as `prlimit --nofile=64 --`), with extra flags.
    pub async fn proxy_under(&self, prefix: &[&str], extra: &[&str]) -> Proxy {
        self.proxy_through(prefix, &self.control_url(), extra, &[])
            .await
    }

    /// A data plane that reaches the control plane at `control_url` (e.g. a [`Relay`]).
    pub async fn proxy_via(
        &self,
        control_url: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Proxy {
        self.proxy_through(&[], control_url, extra, env).await
    }

    async fn proxy_through(
        &self,
        prefix: &[&str],
        control_url: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Proxy {
        let mut args = vec![
            "--control-plane".to_owned(),
            control_url.to_owned(),
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut envs = vec![
            ("SLUICE_DATAPLANE_TOKEN", DATAPLANE_TOKEN),
            ("RUST_LOG", "info"),
        ];
        envs.extend_from_slice(env);
        let bin = workspace_bin("sluice-proxy");
        let child = match prefix.split_first() {
            None => spawn(bin, args, envs),
            Some((command, rest)) => {
                let mut all: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
                all.push(bin.display().to_string());
                all.extend(args);
                spawn(command, all, envs)
            }
        }
        .unwrap();
        let addr = child.wait_for_listening("http", START).await.unwrap();
        let proxy = Proxy {
            child,
            gateway: Gateway::at(addr.port()),
        };
        proxy.wait_ready().await;
        proxy
    }
}

/// The runtime the tests' gRPC connections run on, apart from each test's own. A test's
/// runtime stops running its tasks while the test tears down a [`LocalRun`] (a synchronous
/// `Drop`, waiting for `run.sh` to stop its processes); a connection driven there could not
/// answer the control plane's graceful shutdown, which then waited its whole grace (5 s) at the
/// end of every such test.
static CONNECTIONS: std::sync::LazyLock<tokio::runtime::Runtime> = std::sync::LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("e2e-grpc")
        .enable_all()
        .build()
        .unwrap()
});

/// Spawns a channel's tasks on [`CONNECTIONS`].
#[derive(Debug, Clone, Copy)]
struct OnConnections;

impl<F> hyper::rt::Executor<F> for OnConnections
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, task: F) {
        CONNECTIONS.spawn(task);
    }
}

/// A field mask naming `paths`.
pub fn mask(paths: &[&str]) -> sluice_proto::wkt::FieldMask {
    sluice_proto::wkt::FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    }
}

/// `seconds` as a protobuf duration.
pub fn seconds(seconds: i64) -> sluice_proto::wkt::Duration {
    sluice_proto::wkt::Duration { seconds, nanos: 0 }
}

impl ControlApi {
    /// Sets the settings named in `paths` to their values in `settings`.
    pub async fn set_settings(&self, settings: pb::Settings, paths: &[&str]) {
        self.admin()
            .await
            .update_settings(pb::UpdateSettingsRequest {
                settings: Some(settings),
                update_mask: Some(mask(paths)),
            })
            .await
            .unwrap();
    }

    /// A channel to the control plane whose connection lives on [`CONNECTIONS`]: made there
    /// (lazily, by the first call, so that its socket is registered with that runtime) and
    /// driven there.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url.clone())
            .unwrap()
            .executor(OnConnections)
            .connect_lazy()
    }

    pub async fn admin(&self) -> Admin {
        AdminServiceClient::with_interceptor(self.channel().await, Bearer(ADMIN_TOKEN.into()))
    }

    pub async fn stats(&self) -> Stats {
        StatsServiceClient::with_interceptor(self.channel().await, Bearer(ADMIN_TOKEN.into()))
    }

    pub async fn add_backend(
        &self,
        name: &str,
        mock: &Mock,
        pool: pb::Pool,
        priority: i32,
        models: &[(&str, &str)],
    ) -> pb::Backend {
        self.add_backend_speaking(pb::ApiFormat::Openai, name, mock, pool, priority, models)
            .await
    }

    /// [`Cluster::add_backend`] for a backend speaking `format` (the mock serves both).
    pub async fn add_backend_speaking(
        &self,
        format: pb::ApiFormat,
        name: &str,
        mock: &Mock,
        pool: pb::Pool,
        priority: i32,
        models: &[(&str, &str)],
    ) -> pb::Backend {
        self.add_backend_via(format, name, mock, &mock.base_url(), pool, priority, models)
            .await
    }

    /// [`Cluster::add_backend_speaking`] reached at `base_url`, something in front of the
    /// mock (a TLS terminator), rather than at the mock itself.
    #[allow(dead_code, clippy::too_many_arguments)] // not every test binary fronts a mock
    pub async fn add_backend_via(
        &self,
        format: pb::ApiFormat,
        name: &str,
        mock: &Mock,
        base_url: &str,
        pool: pb::Pool,
        priority: i32,
        models: &[(&str, &str)],
    ) -> pb::Backend {
        let backend = pb::Backend {
            name: name.into(),
            base_url: base_url.into(),
            pool: pool as i32,
            priority,
            weight: 1,
            enabled: true,
            models: models
                .iter()
                .map(|(name, upstream)| pb::ModelRoute {
                    default_max_tokens: Default::default(),
                    max_output_tokens: Default::default(),
                    name: (*name).into(),
                    upstream_name: (*upstream).into(),
                    input_price_per_mtok: 1.0,
                    output_price_per_mtok: 2.0,
                    ..Default::default()
                })
                .collect(),
            api_format: format as i32,
            ..Default::default()
        };
        self.create_backend_for(backend, mock).await
    }

    /// Creates `backend` with `mock`'s API key.
    pub async fn create_backend_for(&self, backend: pb::Backend, mock: &Mock) -> pb::Backend {
        self.admin()
            .await
            .create_backend(pb::CreateBackendRequest {
                backend: Some(backend),
                api_key: mock.api_key.clone().unwrap_or_default(),
            })
            .await
            .unwrap()
            .into_inner()
            .backend
            .unwrap()
    }

    /// `UpdateBackend` of the fields `paths` names, as `backend` has them (its key kept).
    pub async fn update_backend(&self, backend: pb::Backend, paths: &[&str]) -> pb::Backend {
        self.admin()
            .await
            .update_backend(pb::UpdateBackendRequest {
                backend: Some(backend),
                update_mask: Some(sluice_proto::wkt::FieldMask {
                    paths: paths.iter().map(|p| p.to_string()).collect(),
                }),
                api_key: String::new(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .backend
            .unwrap()
    }

    /// An OpenAI-format primary backend `name` for `mock` with these routes as they are
    /// (their prices among them).
    pub async fn add_backend_routing(
        &self,
        name: &str,
        mock: &Mock,
        models: Vec<pb::ModelRoute>,
    ) -> pb::Backend {
        self.add_backend_at(name, &mock.base_url(), mock, models)
            .await
    }

    /// [`Cluster::add_backend_routing`] at `base_url` (a host only an egress proxy reaches,
    /// say), with `mock`'s API key.
    pub async fn add_backend_at(
        &self,
        name: &str,
        base_url: &str,
        mock: &Mock,
        models: Vec<pb::ModelRoute>,
    ) -> pb::Backend {
        let backend = pb::Backend {
            name: name.into(),
            base_url: base_url.into(),
            pool: pb::Pool::Primary as i32,
            weight: 1,
            enabled: true,
            models,
            ..Default::default()
        };
        self.create_backend_for(backend, mock).await
    }

    pub async fn create_key(&self, name: &str, models: &[&str]) -> (pb::ClientKey, String) {
        let r = self
            .admin()
            .await
            .create_client_key(pb::CreateClientKeyRequest {
                name: name.into(),
                allowed_models: models.iter().map(|m| m.to_string()).collect(),
                rpm_limit: 0,
                expire_time: None,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        (r.client_key.unwrap(), r.key)
    }

    /// Creates a key that may use every model and expires at `at`; returns its secret.
    pub async fn create_key_expiring(&self, name: &str, at: std::time::SystemTime) -> String {
        let since_epoch = at.duration_since(std::time::UNIX_EPOCH).unwrap();
        self.admin()
            .await
            .create_client_key(pb::CreateClientKeyRequest {
                name: name.into(),
                expire_time: Some(sluice_proto::wkt::Timestamp {
                    seconds: since_epoch.as_secs() as i64,
                    nanos: since_epoch.subsec_nanos() as i32,
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .key
    }

    /// The client key `id_or_name` as `GetClientKey` shows it (spend, budget, expiry).
    pub async fn client_key(&self, id_or_name: &str) -> pb::ClientKey {
        self.admin()
            .await
            .get_client_key(pb::GetClientKeyRequest {
                id: id_or_name.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .client_key
            .unwrap()
    }

    /// The data planes as `ListDataPlanes` reports them.
    pub async fn data_planes(&self) -> Vec<pb::DataPlane> {
        self.admin()
            .await
            .list_data_planes(pb::ListDataPlanesRequest {})
            .await
            .unwrap()
            .into_inner()
            .data_planes
    }

    /// Waits until `n` data planes are connected and each has acked the newest snapshot,
    /// so everything written before the call (routes, limits, replica shares) is in force.
    ///
    /// Within 30 s: on a machine busy with the whole suite, three replicas took longer than 10 s
    /// once. A timeout says what each replica had acked.
    pub async fn wait_replicas_current(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let planes = self.data_planes().await;
            let current = planes
                .iter()
                .filter(|p| p.connected && p.acked_version == p.latest_version)
                .count();
            if planes.iter().filter(|p| p.connected).count() == n && current == n {
                return;
            }
            let seen: Vec<_> = planes
                .iter()
                .map(|p| (&p.node_id, p.connected, p.acked_version, p.latest_version))
                .collect();
            assert!(
                tokio::time::Instant::now() < deadline,
                "after 30 s not every one of {n} replicas acked the newest snapshot \
                 (node, connected, acked, latest): {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `n` replicas run a snapshot published after version `before` (read with
    /// [`Cluster::latest_version`] before a change), for a change no admin call of the test
    /// made — a cooldown or its end, reported by a replica and committed some time later. After
    /// an admin call, [`Cluster::wait_replicas_current`] is enough: the listed latest version
    /// already counts every committed change.
    pub async fn wait_replicas_past(&self, n: usize, before: u64) {
        eventually(
            Duration::from_secs(10),
            "the control plane publishes the change",
            || async { self.latest_version().await > before },
        )
        .await;
        self.wait_replicas_current(n).await;
    }

    /// Turns `expose_backend_header` on or off: with it on, answers name their backend in
    /// `x-sluice-backend` (tests of routing tell backends apart by it).
    pub async fn expose_backend_header(&self, on: bool) {
        self.set_settings(
            pb::Settings {
                expose_backend_header: on,
                ..Default::default()
            },
            &["expose_backend_header"],
        )
        .await;
    }

    /// The newest snapshot version the control plane has published (0 before any replica
    /// connected).
    pub async fn latest_version(&self) -> u64 {
        self.data_planes()
            .await
            .iter()
            .map(|p| p.latest_version)
            .max()
            .unwrap_or(0)
    }

    /// The cooldowns in force (`ListCooldowns`).
    pub async fn cooldowns(&self) -> Vec<pb::Cooldown> {
        self.admin()
            .await
            .list_cooldowns(pb::ListCooldownsRequest {})
            .await
            .unwrap()
            .into_inner()
            .cooldowns
    }

    pub async fn totals(&self) -> pb::GetTotalsResponse {
        self.stats()
            .await
            .get_totals(pb::GetTotalsRequest::default())
            .await
            .unwrap()
            .into_inner()
    }

    /// `sluicectl ARGS` against this control plane, which must succeed; its standard output.
    pub async fn sluicectl(&self, args: &[&str]) -> String {
        let output = tokio::process::Command::new(workspace_bin("sluicectl"))
            .args(["--endpoint", &self.url, "--token", ADMIN_TOKEN])
            .args(args)
            .env_remove("SLUICE_ENDPOINT")
            .env_remove("SLUICE_ADMIN_TOKEN")
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A `sluice-proxy` process; derefs to its [`Gateway`].
pub struct Proxy {
    pub child: Child,
    gateway: Gateway,
}

impl std::ops::Deref for Proxy {
    type Target = Gateway;
    fn deref(&self) -> &Gateway {
        &self.gateway
    }
}

/// Splits an SSE body into its `data:` payloads.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| {
                    l.strip_prefix("data:")
                        .map(|d| d.strip_prefix(' ').unwrap_or(d))
                })
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// A `sluice-mock` process.
pub struct Mock {
    pub child: Child,
    pub addr: SocketAddr,
    pub api_key: Option<String>,
    http: reqwest::Client,
}

impl Mock {
    pub async fn start(name: &str, models: &[&str]) -> Self {
        Self::start_with(name, models, &[]).await
    }

    pub async fn start_with(name: &str, models: &[&str], extra: &[&str]) -> Self {
        let api_key = format!("sk-upstream-{name}-0000");
        let mut args = vec![
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--name".to_owned(),
            name.to_owned(),
            "--model".to_owned(),
            models.join(","),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = spawn(
            workspace_bin("sluice-mock"),
            args,
            [
                ("SLUICE_MOCK_API_KEY", api_key.as_str()),
                ("RUST_LOG", "warn,sluice_mock=info"),
            ],
        )
        .unwrap();
        let addr = child.wait_for_listening("http", START).await.unwrap();
        Self {
            child,
            addr,
            api_key: Some(api_key),
            http: http_client(),
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub async fn stats(&self) -> MockStats {
        self.get_json("stats").await
    }

    /// `GET /_mock/{what}`, its JSON answer.
    async fn get_json<T: serde::de::DeserializeOwned>(&self, what: &str) -> T {
        self.http
            .get(format!("http://{}/_mock/{what}", self.addr))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn set_faults(&self, faults: Vec<FaultSpec>) {
        let r = self
            .http
            .post(format!("http://{}/_mock/faults", self.addr))
            .json(&faults)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    }

    pub async fn clear_faults(&self) {
        self.http
            .delete(format!("http://{}/_mock/faults", self.addr))
            .send()
            .await
            .unwrap();
    }

    /// The last request to the mock's Messages API and what it answered.
    pub async fn last_messages(&self) -> Option<sluice_e2e::mock::MessagesExchange> {
        self.get_json("last_messages").await
    }
}

/// Polls `check` every 20 ms until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `deploy/local/run.sh` as an operator runs it: a control plane, N data planes and, for
/// N > 1, nginx in front. Stopped (SIGTERM to the script) when dropped.
pub struct LocalRun {
    pub dir: tempfile::TempDir,
    pub script: Child,
    /// The port clients use (nginx's when N > 1).
    pub port: u16,
    pub proxy_ports: Vec<u16>,
    pub proxy_pids: Vec<u32>,
    pub control_pid: u32,
    /// The dashboard's address as run.sh prints it.
    pub dashboard_url: String,
    api: ControlApi,
}

impl std::ops::Deref for LocalRun {
    type Target = ControlApi;
    fn deref(&self) -> &ControlApi {
        &self.api
    }
}

impl LocalRun {
    pub async fn start(replicas: usize) -> Self {
        Self::start_with_env(replicas, &[]).await
    }

    /// [`LocalRun::start`] with environment variables every process it starts inherits
    /// (e.g. a data plane's `SLUICE_BUDGET_WHEN_AWAY`).
    pub async fn start_with_env(replicas: usize, env: &[(&str, &str)]) -> Self {
        Self::start_inner(replicas, env, false).await
    }

    /// [`LocalRun::start`] as a shell in a terminal runs the script: as a job, the leader of
    /// a process group of its own, so that [`LocalRun::interrupt_group`] can press Ctrl-C.
    pub async fn start_as_a_job(replicas: usize) -> Self {
        Self::start_inner(replicas, &[], true).await
    }

    async fn start_inner(replicas: usize, env: &[(&str, &str)], job: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_owned();
        let bin_dir = workspace_bin("sluice-control").parent().unwrap().to_owned();
        // run.sh puts replica i (of more than one) on port + 10 + i: those must be free too.
        let port = loop {
            let port = free_port();
            let replica_ports = (1..=replicas as u16).map(|i| port + 10 + i);
            if replicas == 1 || replica_ports.into_iter().all(reserve) {
                break port;
            }
        };
        let (grpc, http, mock) = (free_port(), free_port(), free_port());
        let data_dir = dir.path().join("data");
        let args: Vec<String> = vec![
            root.join("deploy/local/run.sh").display().to_string(),
            "--replicas".into(),
            replicas.to_string(),
            "--port".into(),
            port.to_string(),
            "--grpc-port".into(),
            grpc.to_string(),
            "--http-port".into(),
            http.to_string(),
            "--mock-port".into(),
            mock.to_string(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--no-demo".into(),
            "--no-build".into(),
            "--bin-dir".into(),
            bin_dir.display().to_string(),
        ];
        let mut envs = vec![
            ("SLUICE_ADMIN_TOKEN", ADMIN_TOKEN),
            ("SLUICE_DATAPLANE_TOKEN", DATAPLANE_TOKEN),
            ("RUST_LOG", "info"),
        ];
        envs.extend_from_slice(env);
        let script = if job {
            sluice_e2e::process::spawn_group_leader("bash", args, envs).unwrap()
        } else {
            spawn("bash", args, envs).unwrap()
        };
        script
            .wait_for_line("Sluice is running", Duration::from_secs(60), |l| {
                l.contains("Sluice is running").then_some(())
            })
            .await
            .unwrap();
        let dashboard_url = script
            .wait_for_line("the dashboard's address", Duration::from_secs(10), |l| {
                let rest = l.trim_start().strip_prefix("dashboard")?;
                rest.split_whitespace().next().map(str::to_owned)
            })
            .await
            .unwrap();
        let env = std::fs::read_to_string(data_dir.join("run/cluster.env")).unwrap();
        let value = |name: &str| -> String {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .unwrap()
                .trim_matches('"')
                .to_owned()
        };
        let numbers = |name: &str| -> Vec<u32> {
            value(name)
                .split_whitespace()
                .map(|p| p.parse().unwrap())
                .collect()
        };
        Self {
            port,
            proxy_ports: numbers("PROXY_PORTS")
                .into_iter()
                .map(|p| p as u16)
                .collect(),
            proxy_pids: numbers("PROXY_PIDS"),
            control_pid: numbers("CONTROL_PID")[0],
            dashboard_url,
            api: ControlApi {
                url: format!("http://127.0.0.1:{grpc}"),
            },
            dir,
            script,
        }
    }

    /// The gateway (nginx) as a proxy handle.
    pub fn front(&self) -> Gateway {
        Gateway::at(self.port)
    }

    /// One replica directly, bypassing nginx.
    pub fn replica(&self, i: usize) -> Gateway {
        Gateway::at(self.proxy_ports[i])
    }

    /// SIGKILLs replica `i` and waits until it is dead: its files closed (its lock on its
    /// data directory released) and its port free, so that it can be started again at once.
    pub async fn kill_replica(&self, i: usize) {
        let pid = self.proxy_pids[i];
        signal(pid, "KILL");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !exited(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "replica {i} (pid {pid}) outlived SIGKILL"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// SIGTERMs replica `i` (a stop: its lame duck, its drain) and waits until it exited.
    pub async fn stop_replica(&self, i: usize) {
        let pid = self.proxy_pids[i];
        signal(pid, "TERM");
        eventually(Duration::from_secs(30), "the replica stopped", || async {
            exited(pid)
        })
        .await;
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to the control plane.
    pub fn signal_control(&self, signal_name: &str) {
        signal(self.control_pid, signal_name);
    }

    /// Starts the control plane again as run.sh started it (same data directory and gRPC
    /// port), as a child of the test, after it was killed; waits until it answers.
    pub async fn restart_control(&self) -> Child {
        let child = spawn(
            workspace_bin("sluice-control"),
            [
                "--data-dir".to_owned(),
                self.dir.path().join("data").display().to_string(),
                "--grpc-listen".to_owned(),
                self.api.url.trim_start_matches("http://").to_owned(),
                "--http-listen".to_owned(),
                "127.0.0.1:0".to_owned(),
            ],
            [
                ("SLUICE_ADMIN_TOKEN", ADMIN_TOKEN),
                ("SLUICE_DATAPLANE_TOKEN", DATAPLANE_TOKEN),
                ("RUST_LOG", "info"),
            ],
        )
        .unwrap();
        child.wait_for_listening("grpc", START).await.unwrap();
        child
    }

    /// The data directory run.sh gives replica `i` (its usage spool).
    pub fn replica_data_dir(&self, i: usize) -> std::path::PathBuf {
        self.dir.path().join(format!("data/proxy-{}", i + 1))
    }

    /// Starts replica `i` again as run.sh started it (same port, node id and data directory),
    /// as a child of the test, and waits until it is ready.
    pub async fn restart_replica(&self, i: usize) -> Child {
        let child = spawn(
            workspace_bin("sluice-proxy"),
            [
                "--control-plane".to_owned(),
                self.api.url.clone(),
                "--listen".to_owned(),
                format!("127.0.0.1:{}", self.proxy_ports[i]),
                "--node-id".to_owned(),
                format!("local-{}", i + 1),
                "--data-dir".to_owned(),
                self.replica_data_dir(i).display().to_string(),
            ],
            [
                ("SLUICE_DATAPLANE_TOKEN", DATAPLANE_TOKEN),
                ("RUST_LOG", "info"),
            ],
        )
        .unwrap();
        child.wait_for_listening("http", START).await.unwrap();
        self.replica(i).wait_ready().await;
        child
    }
}

/// `kill -<signal_name> <pid>`.
pub fn signal(pid: u32, signal_name: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{signal_name}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal_name} {pid}");
}

/// Whether process `pid` has exited: gone, or a zombie (a process the test did not start
/// itself cannot be reaped by it; one it did is reaped only when its handle is dropped).
pub fn exited(pid: u32) -> bool {
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
    });
    // The leader turns zombie while its other threads may still be exiting, and the files
    // they share (a data directory's lock among them) close only when the last of them has:
    // restarted on its directory at that moment, a replica found the lock still held. A
    // thread leaves `task/` once it has exited; the zombie leader stays.
    zombie
        && std::fs::read_dir(format!("/proc/{pid}/task")).map_or(true, |tasks| tasks.count() <= 1)
}

impl LocalRun {
    /// Stops the script with SIGTERM (as Ctrl-C does) and waits, up to 20 s, until it has
    /// stopped what it started; its data directory stays until the run is dropped.
    pub fn stop(&mut self) {
        let Some(pid) = self.script.id() else {
            return;
        };
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        self.wait_stopped(pid);
    }

    /// Ctrl-C in the terminal: SIGINT to the script's whole process group (started with
    /// [`LocalRun::start_as_a_job`]), then waits, up to 20 s, as [`LocalRun::stop`] does.
    pub fn interrupt_group(&mut self) {
        let Some(pid) = self.script.id() else {
            return;
        };
        let status = std::process::Command::new("kill")
            .args(["-INT", "--", &format!("-{pid}")])
            .status()
            .unwrap();
        assert!(status.success(), "kill -INT -- -{pid}");
        self.wait_stopped(pid);
    }

    fn wait_stopped(&self, pid: u32) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !exited(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for LocalRun {
    /// Stops the script (see [`LocalRun::stop`]) rather than dropping its handle, which kills
    /// it at once: killed before its trap has run, it would leave nginx and the servers
    /// running after the test, on ports and files that are gone (an orphaned nginx once held
    /// a lock the benchmarks wait on).
    fn drop(&mut self) {
        self.stop();
    }
}

/// An HTTP endpoint speaking the OpenAI API (a data plane or nginx in front of some).
pub struct Gateway {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
}

impl Gateway {
    pub fn at(port: u16) -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            http: http_client(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + START;
        loop {
            if let Ok(r) = self.http.get(self.url("/readyz")).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "proxy never became ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn post(&self, path: &str, key: &str, body: serde_json::Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn chat(&self, key: &str, model: &str) -> reqwest::Response {
        self.post(
            "/v1/chat/completions",
            key,
            serde_json::json!({"model": model, "messages": [{"role": "user", "content": "say hello to me"}]}),
        )
        .await
    }
}

/// A TCP relay on loopback in front of another address, which a test can cut (every open
/// connection dropped, new ones refused) and heal: a network partition between two real
/// processes.
pub struct Relay {
    pub addr: SocketAddr,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let (accept_open, accept_cut) = (open.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !accept_open.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the peer sees its connection reset
                }
                let mut cuts = accept_cut.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        Self { addr, open, cut }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every relayed connection and refuses new ones until [`Relay::heal`].
    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    pub fn heal(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// `sluice-control` with both listeners on ephemeral ports and `extra` flags: the process, its
/// admin API, and its HTTP listener's base URL.
pub async fn control_plane(dir: &tempfile::TempDir, extra: &[&str]) -> (Child, ControlApi, String) {
    let mut args = vec![
        "--data-dir".to_owned(),
        dir.path().join("data").display().to_string(),
        "--grpc-listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--http-listen".to_owned(),
        "127.0.0.1:0".to_owned(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let child = spawn(
        workspace_bin("sluice-control"),
        args,
        [
            ("SLUICE_ADMIN_TOKEN", ADMIN_TOKEN),
            ("SLUICE_DATAPLANE_TOKEN", DATAPLANE_TOKEN),
            ("RUST_LOG", "info"),
        ],
    )
    .unwrap();
    let grpc = child.wait_for_listening("grpc", START).await.unwrap();
    let http = child.wait_for_listening("http", START).await.unwrap();
    (
        child,
        ControlApi {
            url: format!("http://{grpc}"),
        },
        format!("http://{http}"),
    )
}

/// A replica's report that `backend_id` answered 429, with `reason`: the control plane cools
/// it down. Returns once the cooldown is stored.
pub async fn report_cooldown(api: &ControlApi, backend_id: &str, reason: &str) {
    report_model_cooldown(api, backend_id, "", reason).await
}

/// [`report_cooldown`] of one model at the backend (`""`: the backend's own).
pub async fn report_model_cooldown(api: &ControlApi, backend_id: &str, model: &str, reason: &str) {
    let mut client = DataPlaneServiceClient::with_interceptor(
        api.channel().await,
        Bearer(DATAPLANE_TOKEN.into()),
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let at = |seconds| sluice_proto::wkt::Timestamp { seconds, nanos: 0 };
    let batch = pb::ReportUsageRequest {
        node_id: "replica-events".into(),
        incarnation: "inc-1".into(),
        records: vec![],
        events: vec![pb::BackendEvent {
            backend_id: backend_id.into(),
            model: model.into(),
            kind: pb::BackendEventKind::RateLimited as i32,
            cooldown_until: Some(at(now + 600)),
            consecutive_failures: 2,
            reason: reason.into(),
            time: Some(at(now)),
            // A replica that predates cooldown epochs: its own end time is taken.
            ..Default::default()
        }],
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(batch).await.unwrap();
    let _acks = client
        .report_usage(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap();
    // A batch of events alone is not acked; keep the stream open until it is applied.
    eventually(Duration::from_secs(10), "the cooldown stored", || async {
        api.cooldowns()
            .await
            .iter()
            .any(|c| c.backend_id == backend_id && c.model == model)
    })
    .await;
    drop(tx);
}

/// Runs the Python `script` (`python3 -c`) with `args` and returns what it printed as JSON:
/// how the tests drive the official SDKs, which `e2e/test-all.sh` installs.
pub async fn python(script: &str, args: &[&str]) -> serde_json::Value {
    let output = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .await
        .expect("python3 with the openai and anthropic packages (run e2e/test-all.sh)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "SDK script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}
