//! Bearer-token checks for the gRPC services and the JSON API, in constant time. The admin
//! token guards AdminService and StatsService; a separate data-plane token guards
//! DataPlaneService, whose snapshots carry decrypted provider keys. A failed check is logged
//! (at most one line per [`LOG_INTERVAL`] per token, with the count held back), and an
//! address that keeps failing is refused for a while before its token is looked at
//! ([`throttle`]).

pub mod throttle;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use sluice_domain::logging::LogLimiter;
use subtle::ConstantTimeEq as _;
use tonic::{Request, Status};

use crate::grpc_incoming::Waiting;

use throttle::FailureThrottle;

/// At most one "authentication failed" line per token per this interval.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Accepts requests whose `authorization` header is `Bearer <token>`.
#[derive(Clone)]
pub struct TokenCheck {
    digest: [u8; 32],
    realm: &'static str,
    failures: Arc<FailureThrottle>,
    log: Arc<LogLimiter>,
    /// On the gRPC port: the connections that have made no authenticated request yet, which a
    /// request passing this check marks started (see [`crate::grpc_incoming`]).
    waiting: Option<Waiting>,
}

impl std::fmt::Debug for TokenCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCheck")
            .field("realm", &self.realm)
            .finish_non_exhaustive()
    }
}

impl TokenCheck {
    /// `realm` names the token in error messages and log lines ("admin", "data-plane").
    pub fn new(token: &str, realm: &'static str) -> Self {
        Self {
            digest: Sha256::digest(token.as_bytes()).into(),
            realm,
            failures: Arc::new(FailureThrottle::default()),
            log: Arc::new(LogLimiter::new(LOG_INTERVAL)),
            waiting: None,
        }
    }

    /// Marks the gRPC connection of each request that passes as started in `waiting`.
    pub fn marking_started(mut self, waiting: Waiting) -> Self {
        self.waiting = Some(waiting);
        self
    }

    /// Whether `presented` is the token. Comparing digests keeps the time
    /// independent of both the content and the length of what was presented.
    pub fn matches(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        digest.ct_eq(&self.digest).into()
    }

    /// Checks an `Authorization` header value sent from `peer` (`None` when unknown: then
    /// nothing is throttled).
    pub fn check(&self, header: Option<&str>, peer: Option<IpAddr>) -> Result<(), Status> {
        let now = Instant::now();
        if let Some(peer) = peer
            && let Err(wait) = self.failures.admit(peer, now)
        {
            self.log_failure(Some(peer), "refused: too many failures from this address");
            return Err(Status::resource_exhausted(format!(
                "too many failed {} authentications from this address; try again in {} s",
                self.realm,
                wait.as_secs() + 1
            )));
        }
        let failure = match header {
            None => Some((
                "no token",
                Status::unauthenticated(format!(
                    "missing authorization: send `authorization: Bearer <{} token>`",
                    self.realm
                )),
            )),
            Some(value)
                if !sluice_domain::auth::bearer_token(value).is_some_and(|t| self.matches(t)) =>
            {
                Some((
                    "wrong token",
                    Status::unauthenticated(format!("invalid {} token", self.realm)),
                ))
            }
            Some(_) => None,
        };
        match failure {
            None => Ok(()),
            Some((reason, status)) => {
                // A request without a token guesses nothing, so it does not count towards
                // the address's refusal: any web page the admin visits can make the browser
                // send such requests to the dashboard's address (`fetch` with `no-cors`
                // cannot set `authorization`), and counted they locked the admins out, on
                // the dashboard and on gRPC alike.
                if let Some(peer) = peer
                    && header.is_some()
                {
                    self.failures.failed(peer, now);
                }
                self.log_failure(peer, reason);
                Err(status)
            }
        }
    }

    /// [`TokenCheck::check`] for a caller of unknown address.
    pub fn check_header(&self, header: Option<&str>) -> Result<(), Status> {
        self.check(header, None)
    }

    fn log_failure(&self, peer: Option<IpAddr>, reason: &'static str) {
        if let Some(held_back) = self.log.permit() {
            tracing::warn!(
                realm = self.realm,
                peer = %peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string()),
                reason,
                failures_since_last_line = held_back,
                "authentication failed"
            );
        }
    }
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let peer = request.remote_addr();
        self.check(header, peer.map(|a| a.ip()))?;
        if let (Some(waiting), Some(peer)) = (&self.waiting, peer) {
            waiting.started(peer);
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn an_address_that_keeps_failing_is_refused_before_its_token_is_looked_at() {
        let check = TokenCheck::new("s3cret-token", "admin");
        let attacker: IpAddr = "192.0.2.66".parse().unwrap();
        let admin: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..throttle::BURST {
            let err = check
                .check(Some("Bearer guess"), Some(attacker))
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated);
        }
        // Now even the right token is refused from there, so refusals tell nothing.
        for header in ["Bearer guess", "Bearer s3cret-token"] {
            let err = check.check(Some(header), Some(attacker)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{header}");
        }
        assert!(
            check
                .check(Some("Bearer s3cret-token"), Some(admin))
                .is_ok()
        );
    }

    /// A guesser failing from more addresses than are tracked does not lock out the right
    /// token's holders elsewhere: a replica reconnecting from a new pod address is served.
    #[test]
    fn the_right_token_from_a_new_address_is_served_while_guessers_fill_the_table() {
        let check = TokenCheck::new("dataplane-token-0123456789abcdef", "data-plane");
        for i in 0..(throttle::MAX_TRACKED as u32 + throttle::BURST) {
            let guesser = IpAddr::from((0x0a00_0000u32 + i).to_be_bytes());
            let _ = check.check(Some("Bearer guess"), Some(guesser));
        }
        let replica: IpAddr = "192.0.2.200".parse().unwrap();
        let served = check.check(
            Some("Bearer dataplane-token-0123456789abcdef"),
            Some(replica),
        );
        assert!(served.is_ok(), "{served:?}");
    }

    #[test]
    fn requests_without_a_token_never_lock_an_address_out() {
        let check = TokenCheck::new("s3cret-token", "admin");
        let browser: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..throttle::BURST * 3 {
            let err = check.check(None, Some(browser)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated);
        }
        assert!(
            check
                .check(Some("Bearer s3cret-token"), Some(browser))
                .is_ok()
        );
    }

    #[test]
    fn the_scheme_is_case_insensitive_as_on_the_data_plane() {
        let check = TokenCheck::new("s3cret-token", "admin");
        for ok in [
            "Bearer s3cret-token",
            "bearer s3cret-token",
            "BEARER s3cret-token",
            "Bearer   s3cret-token ",
        ] {
            assert!(check.check_header(Some(ok)).is_ok(), "{ok:?}");
        }
    }

    #[test]
    fn accepts_only_the_bearer_token() {
        let check = TokenCheck::new("s3cret-token", "admin");
        assert!(check.check_header(Some("Bearer s3cret-token")).is_ok());
        for bad in [
            None,
            Some(""),
            Some("Bearer "),
            Some("s3cret-token"),
            Some("Bearer s3cret-tokeN"),
            Some("Basic abc"),
        ] {
            let err = check.check_header(bad).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated);
            assert!(!err.message().contains("s3cret"));
        }
    }
}
