//! Which `Host` the HTTP listener answers to. A page on an attacker's domain can make a
//! browser's DNS point that domain at this server (DNS rebinding) and then read the dashboard
//! or `/metrics` as same-origin; the browser still sends the attacker's name as `Host`. So a
//! request naming a host is answered only when that host is an IP address (a page served from
//! an IP address is this server's own), `localhost`, or a name the operator listed.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sluice_domain::logging::LogLimiter;

/// The host names the operator allows besides IP addresses and `localhost`; `*` allows any.
#[derive(Debug, Clone, Default)]
pub struct AllowedHosts {
    any: bool,
    /// Lower case, without a trailing dot or a port.
    names: Arc<[String]>,
}

/// At most one "unknown host" line per interval: anyone can send such requests.
static REFUSED: LogLimiter = LogLimiter::new(Duration::from_secs(10));

impl AllowedHosts {
    /// From `--allowed-hosts`: names (a port, if given, is ignored) or `*`.
    pub fn new(configured: &[String]) -> Self {
        let any = configured.iter().any(|h| h.trim() == "*");
        let names = configured
            .iter()
            .map(|h| normalize(split_port(h.trim())))
            .filter(|h| !h.is_empty() && h != "*")
            .collect();
        Self { any, names }
    }

    /// Whether a request whose `Host` (or HTTP/2 authority) is `host` may be answered.
    pub fn allows(&self, host: &str) -> bool {
        if self.any {
            return true;
        }
        let name = split_port(host.trim());
        let bare = name.trim_start_matches('[').trim_end_matches(']');
        if bare.parse::<IpAddr>().is_ok() {
            return true;
        }
        let name = normalize(name);
        name == "localhost" || self.names.contains(&name)
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// `host` without a `:port` (IPv6 literals keep their brackets).
fn split_port(host: &str) -> &str {
    if let Some(end) = host.strip_prefix('[').and_then(|rest| rest.find(']')) {
        return &host[..end + 2];
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    }
}

/// Refuses requests for a host this server does not answer to (403). Health checks are
/// answered whatever the host: they tell nothing, and probes must reach them by any name.
pub async fn check_host(
    State(allowed): State<AllowedHosts>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    if path == "/healthz" || path == "/readyz" {
        return next.run(request).await;
    }
    let host = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        });
    match host {
        Some(host) if !allowed.allows(&host) => {
            if let Some(held_back) = REFUSED.permit() {
                tracing::warn!(
                    // Quoted (`?`): a client's `Host` written bare could forge a field for a
                    // logfmt reader (`x" level=error`).
                    host = ?sluice_domain::text::quoted(&host),
                    refused_since_last_line = held_back,
                    "refused an HTTP request for a host this server does not answer to; \
                     if it is a name of this server, add it to --allowed-hosts"
                );
            }
            (
                StatusCode::FORBIDDEN,
                "This server does not answer to that host name. Use its address, or add the \
                 name to the control plane's --allowed-hosts (SLUICE_ALLOWED_HOSTS).\n",
            )
                .into_response()
        }
        _ => next.run(request).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_localhost_and_listed_names_only() {
        let hosts =
            AllowedHosts::new(&["Sluice.Example.com".into(), "metrics.internal:9000".into()]);
        for ok in [
            "127.0.0.1:8081",
            "10.1.2.3",
            "[::1]:8081",
            "[fe80::1]",
            "localhost:8081",
            "LOCALHOST",
            "sluice.example.com",
            "sluice.example.com.:443",
            "metrics.internal:1234",
        ] {
            assert!(hosts.allows(ok), "{ok}");
        }
        for refused in [
            "evil.example",
            "evil.example:8081",
            "127.0.0.1.nip.io",
            "localhost.evil.example",
            "sluice.example.com.evil",
            "",
        ] {
            assert!(!hosts.allows(refused), "{refused}");
        }
        assert!(AllowedHosts::new(&["*".into()]).allows("anything.example"));
        assert!(!AllowedHosts::default().allows("sluice.example.com"));
    }
}
