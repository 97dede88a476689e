//! Bearer-token checks for the gRPC services, in constant time. The admin token
//! guards AdminService and StatsService; a separate data-plane token guards
//! DataPlaneService, whose snapshots carry decrypted provider keys.

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tonic::{Request, Status};

/// Accepts requests whose `authorization` header is `Bearer <token>`.
#[derive(Clone)]
pub struct TokenCheck {
    digest: [u8; 32],
    realm: &'static str,
}

impl std::fmt::Debug for TokenCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCheck")
            .field("realm", &self.realm)
            .finish_non_exhaustive()
    }
}

impl TokenCheck {
    /// `realm` names the token in error messages ("admin", "data-plane").
    pub fn new(token: &str, realm: &'static str) -> Self {
        Self {
            digest: Sha256::digest(token.as_bytes()).into(),
            realm,
        }
    }

    /// Whether `presented` is the token. Comparing digests keeps the time
    /// independent of both the content and the length of what was presented.
    pub fn matches(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        digest.ct_eq(&self.digest).into()
    }

    /// Checks an `Authorization` header value.
    pub fn check_header(&self, header: Option<&str>) -> Result<(), Status> {
        let Some(value) = header else {
            return Err(Status::unauthenticated(format!(
                "missing authorization: send `authorization: Bearer <{} token>`",
                self.realm
            )));
        };
        if !sluice_domain::auth::bearer_token(value).is_some_and(|token| self.matches(token)) {
            return Err(Status::unauthenticated(format!(
                "invalid {} token",
                self.realm
            )));
        }
        Ok(())
    }
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        self.check_header(header)?;
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

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
