//! The gRPC connection to the control plane: one lazily connected channel, every call
//! carrying the data-plane token, and who this replica is.

use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use sluice_proto::limits;
use sluice_proto::v1::data_plane_service_client::DataPlaneServiceClient;
use sluice_proto::v1::{BackendEvent, ReportUsageResponse};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// The client for `DataPlaneService`, authenticated.
pub type DataPlaneClient = DataPlaneServiceClient<InterceptedService<Channel, BearerToken>>;

/// A `ReportUsageRequest` whose records were encoded once, when the request path recorded
/// them (and wrote the same bytes to the spool): a length-delimited field holding a message's
/// encoding is, on the wire, exactly that message, so the control plane reads this as the
/// `ReportUsageRequest` of `proto/sluice/v1/data_plane.proto`, whose field numbers it repeats.
/// Sending `UsageRecord`s instead would mean cloning and encoding each record again in the
/// reporter: per request, more work than the rest of the reporter.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Report {
    #[prost(string, tag = "1")]
    pub node_id: String,
    #[prost(string, tag = "2")]
    pub incarnation: String,
    /// Each an encoded `UsageRecord`.
    #[prost(bytes = "bytes", repeated, tag = "3")]
    pub records: Vec<Bytes>,
    #[prost(message, repeated, tag = "4")]
    pub events: Vec<BackendEvent>,
    #[prost(uint64, tag = "5")]
    pub previous_sequence: u64,
    /// The database of the snapshot this replica serves (empty before its first).
    #[prost(string, tag = "6")]
    pub database_id: String,
}

/// `DataPlaneService.ReportUsage`, sending [`Report`]s; authenticated like
/// [`DataPlaneClient`], on a connection of its own (so a large snapshot never queues behind
/// usage, nor usage behind it).
#[derive(Debug, Clone)]
pub struct UsageClient(tonic::client::Grpc<InterceptedService<Channel, BearerToken>>);

impl UsageClient {
    /// Opens a `ReportUsage` stream carrying `reports`; yields the control plane's acks.
    pub async fn report_usage(
        &mut self,
        reports: impl Stream<Item = Report> + Send + 'static,
    ) -> Result<tonic::Streaming<ReportUsageResponse>, tonic::Status> {
        self.0
            .ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("control plane unreachable: {e}")))?;
        let codec = sluice_proto::codec::SliceCodec::<Report, ReportUsageResponse>::default();
        let path = PathAndQuery::from_static("/sluice.v1.DataPlaneService/ReportUsage");
        let mut request = tonic::Request::new(reports);
        request.extensions_mut().insert(tonic::GrpcMethod::new(
            "sluice.v1.DataPlaneService",
            "ReportUsage",
        ));
        Ok(self.0.streaming(request, path, codec).await?.into_inner())
    }
}

/// Errors that make the control-plane connection impossible to even configure.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("invalid control plane URL: {0}")]
    InvalidUrl(String),
    #[error("the data-plane token contains characters not allowed in a header")]
    InvalidToken,
    #[error("TLS setup for the control plane failed: {0}")]
    Tls(String),
}

/// Adds `authorization: Bearer <token>` to every call. Its `Debug` never shows the token.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(..)")
    }
}

impl BearerToken {
    pub fn new(token: Option<&str>) -> Result<Self, ControlError> {
        let Some(token) = token.map(str::trim).filter(|t| !t.is_empty()) else {
            return Ok(Self(None));
        };
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| ControlError::InvalidToken)?;
        value.set_sensitive(true);
        Ok(Self(Some(value)))
    }
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A client to the control plane at `url`. The channel connects lazily and reconnects by
/// itself; HTTP/2 keep-alives notice a vanished control plane within about 30 s. Snapshots
/// up to [`limits::MAX_SNAPSHOT_BYTES`] are accepted, usage reports up to
/// [`limits::MAX_USAGE_REPORT_BYTES`] sent.
pub fn connect(url: &str, token: Option<&str>) -> Result<DataPlaneClient, ControlError> {
    connect_with_ca(url, token, None)
}

/// [`connect`], trusting `ca_pem` (PEM certificates) for an `https://` control plane.
pub fn connect_with_ca(
    url: &str,
    token: Option<&str>,
    ca_pem: Option<&[u8]>,
) -> Result<DataPlaneClient, ControlError> {
    Ok(
        DataPlaneServiceClient::with_interceptor(channel(url, ca_pem)?, BearerToken::new(token)?)
            .max_decoding_message_size(limits::MAX_SNAPSHOT_BYTES)
            .max_encoding_message_size(limits::MAX_USAGE_REPORT_BYTES),
    )
}

/// The [`UsageClient`] for the control plane at `url`, connecting as [`connect_with_ca`] does.
pub fn usage_client(
    url: &str,
    token: Option<&str>,
    ca_pem: Option<&[u8]>,
) -> Result<UsageClient, ControlError> {
    let service = InterceptedService::new(channel(url, ca_pem)?, BearerToken::new(token)?);
    Ok(UsageClient(
        tonic::client::Grpc::new(service)
            .max_decoding_message_size(limits::MAX_SNAPSHOT_BYTES)
            .max_encoding_message_size(limits::MAX_USAGE_REPORT_BYTES),
    ))
}

/// A lazily connecting channel to `url`; see [`connect`].
fn channel(url: &str, ca_pem: Option<&[u8]>) -> Result<Channel, ControlError> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| ControlError::InvalidUrl(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if url.starts_with("https://") {
        // Without a CA of its own, the system's roots (tonic trusts none by default).
        let tls = match ca_pem {
            Some(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
            None => ClientTlsConfig::new().with_native_roots(),
        };
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| ControlError::Tls(e.to_string()))?;
    } else if ca_pem.is_some() {
        // A CA given for a plain http:// URL would be read and ignored: the token and the
        // snapshots (decrypted provider keys) would go out in clear.
        return Err(ControlError::Tls(
            "--control-plane-ca needs an https:// control plane URL".to_owned(),
        ));
    }
    Ok(endpoint.connect_lazy())
}

/// Who this replica is, as told to the control plane.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    /// Stable for the life of the process.
    pub node_id: String,
    pub hostname: String,
    pub build_version: String,
    /// Random per process start: a restarted replica starts a new usage sequence.
    pub incarnation: String,
}

impl NodeIdentity {
    /// `node_id` as given, or `<hostname>-<8 random hex digits>`.
    pub fn new(node_id: Option<String>) -> Self {
        let hostname = hostname();
        let incarnation = uuid::Uuid::new_v4().to_string();
        let node_id = node_id
            .filter(|id| !id.trim().is_empty())
            .unwrap_or_else(|| format!("{hostname}-{}", &incarnation[..8]));
        Self {
            node_id,
            hostname,
            build_version: build_version(),
            incarnation,
        }
    }
}

/// This build as `sluicectl dataplane list` shows it: the package version, and the build's
/// name given when it was compiled (`SLUICE_BUILD`, e.g. its commit: the Dockerfile takes it as
/// a build argument), so that replicas of two builds of one version are told apart.
pub fn build_version() -> String {
    named_build(env!("CARGO_PKG_VERSION"), option_env!("SLUICE_BUILD"))
}

fn named_build(version: &str, build: Option<&str>) -> String {
    match build.map(str::trim) {
        Some(build) if !build.is_empty() => format!("{version}+{build}"),
        _ => version.to_owned(),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A build named when it was compiled shows its name after the version; one not named
    /// (or named blank) shows the version alone.
    #[test]
    fn a_named_build_is_its_version_and_its_name() {
        assert_eq!(named_build("0.1.0", Some("3f4d0e1")), "0.1.0+3f4d0e1");
        assert_eq!(named_build("0.1.0", Some(" 3f4d0e1\n")), "0.1.0+3f4d0e1");
        assert_eq!(named_build("0.1.0", Some(" ")), "0.1.0");
        assert_eq!(named_build("0.1.0", None), "0.1.0");
        assert!(build_version().starts_with(env!("CARGO_PKG_VERSION")));
    }
}
