//! The admin and stats APIs as proto3 JSON over HTTP, for the dashboard:
//! `POST /api/sluice.v1.AdminService/<Method>` and `POST /api/sluice.v1.StatsService/<Method>`.
//! Each call goes to the same [`Admin`]/[`Stats`] value the gRPC server uses, behind the
//! same [`TokenCheck`], so validation and errors are the gRPC ones, mapped once to HTTP.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Extension;
use axum::extract::ConnectInfo;
use std::future::Future;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest as _, Path, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sluice_proto::v1::admin_service_server::AdminService as _;
use sluice_proto::v1::stats_service_server::StatsService as _;
use tonic::{Code, Status};

use crate::api::admin::Admin;
use crate::api::auth::TokenCheck;
use crate::api::stats::Stats;
use crate::grpc_code;

/// The largest request body the JSON API reads.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// The services behind the JSON API and the token that guards them.
#[derive(Clone)]
pub struct JsonApi {
    admin: Admin,
    stats: Stats,
    check: TokenCheck,
    /// A request's whole body must arrive within this once its handler started.
    body_read_timeout: Duration,
}

impl JsonApi {
    /// `check` must be the admin token check the gRPC services use.
    pub fn new(admin: Admin, stats: Stats, check: TokenCheck, body_read_timeout: Duration) -> Self {
        Self {
            admin,
            stats,
            check,
            body_read_timeout,
        }
    }
}

/// An error answer: `{"code":"INVALID_ARGUMENT","message":"backend.base_url: must use http or https"}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: Code,
    message: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'static str,
    message: &'a str,
}

impl ApiError {
    fn http(status: StatusCode, code: Code, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl From<Status> for ApiError {
    fn from(status: Status) -> Self {
        Self {
            status: grpc_code::http_status(status.code()),
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: grpc_code::name(self.code),
            message: &self.message,
        };
        let mut response = (self.status, Json(body)).into_response();
        // For the metrics: the code this answer stands for.
        response.extensions_mut().insert(self.code);
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            response
                .headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
        }
        response
    }
}

/// A proto3 JSON answer, never cached.
struct JsonAnswer(Vec<u8>);

impl IntoResponse for JsonAnswer {
    fn into_response(self) -> Response {
        let mut response = ([(header::CONTENT_TYPE, "application/json")], self.0).into_response();
        response.extensions_mut().insert(Code::Ok);
        response
    }
}

/// A field that did not decode, named by its path (`backend.rpmLimit: …`). A number that is
/// no whole number in its field's range fails every form proto3 JSON takes it in (number or
/// string), which serde says as "data did not match any variant of untagged enum": said plainly.
fn field_error(err: &serde_path_to_error::Error<serde_json::Error>) -> String {
    let inner = err.inner().to_string();
    let problem = if inner.contains("did not match any variant of untagged enum") {
        "must be a number of the field's type within its range (limits and counts are whole \
         numbers of 32 bits)"
            .to_owned()
    } else {
        inner
    };
    match err.path().to_string().as_str() {
        "." => problem,
        path => format!("{path}: {problem}"),
    }
}

/// Decodes the body (empty is `{}`), calls the service, encodes its answer.
async fn call<Req, Resp, F, Fut>(body: &[u8], service: F) -> Result<JsonAnswer, ApiError>
where
    Req: DeserializeOwned + Default,
    Resp: Serialize,
    F: FnOnce(tonic::Request<Req>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    let request = if body.iter().all(u8::is_ascii_whitespace) {
        Req::default()
    } else {
        let bad = |e: serde_json::Error| Status::invalid_argument(format!("request body: {e}"));
        let mut value: serde_json::Value = serde_json::from_slice(body).map_err(bad)?;
        standard_field_masks(&mut value);
        serde_path_to_error::deserialize(value)
            .map_err(|e| Status::invalid_argument(format!("request body: {}", field_error(&e))))?
    };
    let response = service(tonic::Request::new(request)).await?;
    let json = serde_json::to_vec(response.get_ref()).map_err(|e| {
        tracing::error!(error = %e, "cannot encode a JSON API answer");
        Status::internal("cannot encode the answer as JSON")
    })?;
    Ok(JsonAnswer(json))
}

/// The proto3 JSON mapping writes a `FieldMask` as one string of comma-separated
/// camelCase paths (`"baseUrl,priority"`), but pbjson-types only reads the message form
/// (`{"paths": ["base_url"]}`). Rewrites the string form of the top-level `updateMask`
/// into the message form with the field names the services expect.
fn standard_field_masks(value: &mut serde_json::Value) {
    let Some(object) = value.as_object_mut() else {
        return;
    };
    for key in ["updateMask", "update_mask"] {
        if let Some(mask) = object.get_mut(key)
            && let Some(paths) = mask.as_str()
        {
            let paths: Vec<serde_json::Value> = paths
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| snake_case(p).into())
                .collect();
            *mask = serde_json::json!({ "paths": paths });
        }
    }
}

fn snake_case(path: &str) -> String {
    let mut out = String::with_capacity(path.len() + 4);
    for c in path.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Writes the table of methods once: `"Name" => trait_method`.
macro_rules! dispatch {
    ($service:expr, $method:expr, $body:expr, $prefix:literal, { $($name:literal => $func:ident),* $(,)? }) => {
        match $method {
            $($name => call($body, |r| $service.$func(r)).await,)*
            other => Err(ApiError::from(Status::not_found(format!(
                concat!("unknown method ", $prefix, "/{}"),
                other
            )))),
        }
    };
}

/// Checks the method and the token, then reads the body (its size limited, and within
/// the body read timeout).
///
/// The body is read only once the token checked: read first (as an extractor would), a
/// client without the token could hold a megabyte of memory per request, on as many
/// connections and h2 streams as it likes, for as long as it likes.
async fn admit(
    api: &JsonApi,
    method: &Method,
    headers: &HeaderMap,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    request: Request,
) -> Result<Bytes, ApiError> {
    if method != Method::POST {
        return Err(ApiError::http(
            StatusCode::METHOD_NOT_ALLOWED,
            Code::Unimplemented,
            format!("{method} is not allowed: the JSON API takes POST"),
        ));
    }
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let peer = peer.map(|Extension(ConnectInfo(addr))| addr.ip());
    api.check.check(authorization, peer)?;
    let body = tokio::time::timeout(api.body_read_timeout, Bytes::from_request(request, &()))
        .await
        .map_err(|_| {
            ApiError::http(
                StatusCode::REQUEST_TIMEOUT,
                Code::DeadlineExceeded,
                format!(
                    "request body: not received within {}",
                    humantime::format_duration(api.body_read_timeout)
                ),
            )
        })?;
    body.map_err(|rejection: BytesRejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::http(
                StatusCode::PAYLOAD_TOO_LARGE,
                Code::ResourceExhausted,
                format!("request body: larger than {BODY_LIMIT} bytes"),
            )
        } else {
            ApiError::from(Status::invalid_argument(format!(
                "request body: {}",
                rejection.body_text()
            )))
        }
    })
}

/// `/api/sluice.v1.AdminService/{method}`
pub async fn admin(
    State(api): State<JsonApi>,
    Path(name): Path<String>,
    method: Method,
    headers: HeaderMap,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    request: Request,
) -> Result<impl IntoResponse, ApiError> {
    let body = admit(&api, &method, &headers, peer, request).await?;
    let admin = &api.admin;
    dispatch!(admin, name.as_str(), &body, "sluice.v1.AdminService", {
        "CreateBackend" => create_backend,
        "GetBackend" => get_backend,
        "ListBackends" => list_backends,
        "UpdateBackend" => update_backend,
        "DeleteBackend" => delete_backend,
        "CreateClientKey" => create_client_key,
        "GetClientKey" => get_client_key,
        "ListClientKeys" => list_client_keys,
        "UpdateClientKey" => update_client_key,
        "RevokeClientKey" => revoke_client_key,
        "ListCooldowns" => list_cooldowns,
        "ResetCooldown" => reset_cooldown,
        "ListDataPlanes" => list_data_planes,
        "GetSettings" => get_settings,
        "UpdateSettings" => update_settings,
        "RotateAffinityKey" => rotate_affinity_key,
    })
}

/// `/api/sluice.v1.StatsService/{method}`
pub async fn stats(
    State(api): State<JsonApi>,
    Path(name): Path<String>,
    method: Method,
    headers: HeaderMap,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    request: Request,
) -> Result<impl IntoResponse, ApiError> {
    let body = admit(&api, &method, &headers, peer, request).await?;
    let stats = &api.stats;
    dispatch!(stats, name.as_str(), &body, "sluice.v1.StatsService", {
        "GetUsage" => get_usage,
        "GetTotals" => get_totals,
    })
}

/// Any other path under `/api/`.
pub async fn unknown_service(Path(path): Path<String>) -> ApiError {
    ApiError::from(Status::not_found(format!(
        "unknown service or method /api/{path}"
    )))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn reads_the_standard_field_mask_form() {
        let mut value = serde_json::json!({"updateMask": "baseUrl, rpmLimit,enabled"});
        standard_field_masks(&mut value);
        assert_eq!(
            value,
            serde_json::json!({"updateMask": {"paths": ["base_url", "rpm_limit", "enabled"]}})
        );
        let mut message_form = serde_json::json!({"update_mask": {"paths": ["name"]}});
        let before = message_form.clone();
        standard_field_masks(&mut message_form);
        assert_eq!(message_form, before);
    }
}
