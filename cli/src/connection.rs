//! The connection to the control plane: endpoint, TLS, the admin token on
//! every call, and one deadline for connecting and answering.

use std::future::Future;
use std::time::Duration;

use sluice_proto::limits;
use sluice_proto::v1::admin_service_client::AdminServiceClient;
use sluice_proto::v1::stats_service_client::StatsServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Response, Status};

use crate::args::GlobalArgs;
use crate::error::Error;

/// An `AdminService` client that sends the admin token.
pub type AdminClient = AdminServiceClient<InterceptedService<Channel, BearerAuth>>;
/// A `StatsService` client that sends the admin token.
pub type StatsClient = StatsServiceClient<InterceptedService<Channel, BearerAuth>>;

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub struct BearerAuth(MetadataValue<Ascii>);

impl Interceptor for BearerAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// Everything needed to reach the control plane; connects on first use so
/// that local input errors show before any network error.
pub struct Connection {
    endpoint: String,
    timeout: Duration,
    tls: Option<ClientTlsConfig>,
    auth: BearerAuth,
}

impl Connection {
    /// Reads the token and CA certificate named by the global flags.
    pub fn new(global: &GlobalArgs) -> Result<Self, Error> {
        let token = read_token(global)?;
        let mut header = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
            Error::Input("the admin token contains characters not allowed in a header".to_owned())
        })?;
        header.set_sensitive(true);

        let tls = if global.endpoint.starts_with("https://") {
            let config = ClientTlsConfig::new();
            Some(match &global.ca_cert {
                Some(path) => {
                    let pem = std::fs::read(path).map_err(|err| {
                        Error::Input(format!("cannot read --ca-cert {}: {err}", path.display()))
                    })?;
                    config.ca_certificate(Certificate::from_pem(pem))
                }
                None => config.with_enabled_roots(),
            })
        } else if global.ca_cert.is_some() {
            return Err(Error::Usage(
                "--ca-cert needs an https:// endpoint".to_owned(),
            ));
        } else {
            None
        };

        Ok(Self {
            endpoint: global.endpoint.clone(),
            timeout: global.timeout,
            tls,
            auth: BearerAuth(header),
        })
    }

    /// Connects and returns an `AdminService` client.
    pub async fn admin(&self) -> Result<AdminClient, Error> {
        let channel = self.channel().await?;
        Ok(
            AdminServiceClient::with_interceptor(channel, self.auth.clone())
                .max_decoding_message_size(limits::MAX_ADMIN_RESPONSE_BYTES)
                .max_encoding_message_size(limits::MAX_ADMIN_REQUEST_BYTES),
        )
    }

    /// Connects and returns a `StatsService` client.
    pub async fn stats(&self) -> Result<StatsClient, Error> {
        let channel = self.channel().await?;
        Ok(
            StatsServiceClient::with_interceptor(channel, self.auth.clone())
                .max_decoding_message_size(limits::MAX_ADMIN_RESPONSE_BYTES)
                .max_encoding_message_size(limits::MAX_ADMIN_REQUEST_BYTES),
        )
    }

    /// Awaits one call within the deadline and turns a failure into an `Error`.
    pub async fn call<T>(
        &self,
        call: impl Future<Output = Result<Response<T>, Status>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(Error::from_status(&status, &self.endpoint)),
            Err(_) => Err(Error::Timeout {
                endpoint: self.endpoint.clone(),
                timeout: humantime::format_duration(self.timeout).to_string(),
            }),
        }
    }

    /// Like [`Connection::call`], but `NOT_FOUND` is `Ok(None)`.
    pub async fn find<T>(
        &self,
        call: impl Future<Output = Result<Response<T>, Status>>,
    ) -> Result<Option<T>, Error> {
        self.call_or_none(Code::NotFound, call).await
    }

    /// Like [`Connection::call`], but `ABORTED` (a conditional change found the record
    /// changed since it was read) is `Ok(None)`.
    pub async fn unless_changed<T>(
        &self,
        call: impl Future<Output = Result<Response<T>, Status>>,
    ) -> Result<Option<T>, Error> {
        self.call_or_none(Code::Aborted, call).await
    }

    async fn call_or_none<T>(
        &self,
        none: Code,
        call: impl Future<Output = Result<Response<T>, Status>>,
    ) -> Result<Option<T>, Error> {
        self.call(async {
            match call.await {
                Err(status) if status.code() == none => Ok(Response::new(None)),
                other => other.map(|response| response.map(Some)),
            }
        })
        .await
    }

    async fn channel(&self) -> Result<Channel, Error> {
        let mut endpoint = Endpoint::from_shared(self.endpoint.clone())
            .map_err(|err| Error::unreachable(&self.endpoint, &err))?
            .connect_timeout(self.timeout);
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|err| Error::unreachable(&self.endpoint, &err))?;
        }
        match tokio::time::timeout(self.timeout, endpoint.connect()).await {
            Ok(Ok(channel)) => Ok(channel),
            Ok(Err(err)) => Err(Error::unreachable(&self.endpoint, &err)),
            Err(_) => Err(Error::Unreachable {
                endpoint: self.endpoint.clone(),
                reason: format!(
                    "no connection within {}",
                    humantime::format_duration(self.timeout)
                ),
            }),
        }
    }
}

/// The admin token from `--token-file`, else `--token` / `SLUICE_ADMIN_TOKEN`.
fn read_token(global: &GlobalArgs) -> Result<String, Error> {
    let token = match (&global.token_file, &global.token) {
        (Some(path), _) => std::fs::read_to_string(path)
            .map_err(|err| {
                Error::Input(format!(
                    "cannot read --token-file {}: {err}",
                    path.display()
                ))
            })?
            .trim()
            .to_owned(),
        (None, Some(token)) => token.trim().to_owned(),
        (None, None) => String::new(),
    };
    if token.is_empty() {
        return Err(Error::Input(
            "no admin token: pass --token or --token-file (sluice-control writes one to \
             <data-dir>/admin-token), or set SLUICE_ADMIN_TOKEN"
                .to_owned(),
        ));
    }
    Ok(token)
}
