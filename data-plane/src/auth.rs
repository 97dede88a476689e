//! Client authentication: the key named by `Authorization: Bearer <key>` (on Anthropic's
//! routes also by `x-api-key`, which Anthropic clients send), looked up in the snapshot by its
//! SHA-256.
//!
//! Hashing a key costs more than the rest of a request's authentication, routing and
//! accounting together (about 7,000 instructions of about 60,000), and clients send the same
//! few keys again and again. So each thread keeps the SHA-256 of the keys that authenticated
//! on it, found by a keyed hash of the presented key and confirmed by comparing the whole key
//! in constant time. The cache only saves the hashing: every request is still checked against
//! the snapshot it runs under, so a revoked key is refused as soon as the snapshot without it
//! arrives. Keys that fail are never cached, so made-up keys cannot crowd out real ones.
//!
//! The keyed hash only picks the slot to compare against, so it need not be SipHash: a seeded
//! foldhash costs a fifth as much, and a key whose hash meets a cached key's slot is still
//! compared in full (only keys that authenticated are ever cached, so nobody can fill slots
//! with keys of their choosing). The comparison takes eight bytes at a time.
//! An expired key is found like any other and then refused as expired: the control plane
//! marks it so in the snapshot when it expires (by its clock), and a replica refuses it by
//! its own clock a minute (`snapshot::EXPIRY_GRACE`) past its `expire_time` too, which is
//! what refuses it on a replica cut off from the control plane.

use std::cell::RefCell;
use std::hash::BuildHasher;
use std::time::SystemTime;

use http::{HeaderMap, HeaderName, header};
use sluice_domain::auth::{bearer_token, client_key_hash};
use subtle::ConstantTimeEq as _;

use crate::error::ProxyError;
use crate::snapshot::{ApiFormat, ClientKey, Snapshot};

/// The header Anthropic's API takes its key in.
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Keys remembered per thread; past this many the cache starts over.
const CACHED_KEYS: usize = 4096;

/// The client key named by `Authorization: Bearer <key>`, if the snapshot holds it and it
/// has not expired. A client of an Anthropic route (`format`) may name it in `x-api-key`
/// instead, which wins when both name a key: Anthropic's SDKs send `x-api-key`, their newest
/// versions `Authorization: Bearer`. A blank `x-api-key`, or one naming no key, leaves the
/// bearer token to name it: both SDKs send `X-Api-Key: ` for an `ANTHROPIC_API_KEY` set
/// empty, beside the `ANTHROPIC_AUTH_TOKEN` in `Authorization` (the setup gateways' guides
/// for Claude Code give), and one naming the user's own Anthropic key beside it.
pub fn authenticate<'s>(
    snapshot: &'s Snapshot,
    headers: &HeaderMap,
    format: ApiFormat,
    now: SystemTime,
) -> Result<&'s ClientKey, ProxyError> {
    let find = |key: &str| KEY_HASHES.with_borrow_mut(|hashes| hashes.find(snapshot, key));
    let bearer = || -> Result<&str, ProxyError> {
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or(ProxyError::MissingApiKey)?
            .to_str()
            .map_err(|_| ProxyError::InvalidApiKey)?;
        bearer_token(value).ok_or(ProxyError::InvalidApiKey)
    };
    // Looked up only where it may be used: a name given as text is parsed on each lookup.
    let x_api_key = (format == ApiFormat::Anthropic)
        .then(|| headers.get(X_API_KEY))
        .flatten()
        .map(|value| value.to_str().ok().map(str::trim).filter(|k| !k.is_empty()));
    let found = match x_api_key {
        None => find(bearer()?)?,
        Some(Some(key)) => match find(key) {
            Ok(found) => found,
            Err(unknown) => match bearer() {
                Ok(key) => find(key)?,
                Err(_) => return Err(unknown),
            },
        },
        Some(None) => find(bearer().map_err(|_| ProxyError::InvalidApiKey)?)?,
    };
    if found.expired_at(now) {
        return Err(ProxyError::KeyExpired);
    }
    Ok(found)
}

thread_local! {
    static KEY_HASHES: RefCell<KeyHashes> = RefCell::new(KeyHashes::default());
}

/// The SHA-256 of keys that authenticated on this thread, by a keyed hash of the key.
#[derive(Default)]
struct KeyHashes {
    seed: foldhash::quality::RandomState,
    /// By `seed`'s hash of the key.
    entries: foldhash::HashMap<u64, (Box<[u8]>, [u8; 32])>,
}

impl KeyHashes {
    fn find<'s>(&mut self, snapshot: &'s Snapshot, key: &str) -> Result<&'s ClientKey, ProxyError> {
        let slot = self.seed.hash_one(key);
        if let Some((known, sha256)) = self.entries.get(&slot)
            && same_bytes(known, key.as_bytes())
        {
            return snapshot.client_key(sha256).ok_or(ProxyError::InvalidApiKey);
        }
        let sha256 = client_key_hash(key);
        let found = snapshot
            .client_key(&sha256)
            .ok_or(ProxyError::InvalidApiKey)?;
        if self.entries.len() >= CACHED_KEYS {
            self.entries.clear();
        }
        self.entries.insert(slot, (key.as_bytes().into(), sha256));
        Ok(found)
    }
}

/// Whether `a` and `b` hold the same bytes, in a time that depends only on their lengths:
/// eight bytes per constant-time step, instead of `subtle`'s one (a 50-byte key took about 600
/// instructions).
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (a_words, a_rest) = a.as_chunks::<8>();
    let (b_words, b_rest) = b.as_chunks::<8>();
    let mut same = a_rest.ct_eq(b_rest);
    for (x, y) in a_words.iter().zip(b_words) {
        same &= u64::from_ne_bytes(*x).ct_eq(&u64::from_ne_bytes(*y));
    }
    bool::from(same)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    use crate::clock::Now;
    use crate::snapshot::EXPIRY_GRACE;
    use crate::snapshot::tests::{proto_with_keys, snapshot_with_keys};

    fn bearer(key: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            format!("Bearer {key}").parse().unwrap(),
        );
        headers
    }

    #[test]
    fn same_bytes_tells_every_differing_byte_and_length() {
        for len in 0..=40 {
            let key: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            assert!(same_bytes(&key, &key.clone()), "{len}");
            for at in 0..len {
                let mut other = key.clone();
                other[at] ^= 0x20;
                assert!(!same_bytes(&key, &other), "{len} at {at}");
            }
            if len > 0 {
                assert!(!same_bytes(&key, &key[..len - 1]), "{len}");
            }
            let mut longer = key.clone();
            longer.push(b'x');
            assert!(!same_bytes(&key, &longer), "{len}");
        }
    }

    /// A key's expire time refuses it by this replica's clock only a minute past it (the
    /// control plane's `expired` decides before: a replica whose clock runs ahead by less
    /// than that never refuses it early); the control plane's flag refuses it at once.
    #[tokio::test]
    async fn a_key_is_refused_by_its_expire_time_a_minute_past_it() {
        let expiry = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(2_000_000_000);
        let mut message = proto_with_keys(&[("k1", "sk-one")]);
        message.client_keys[0].expire_time = Some(sluice_domain::time::timestamp(expiry));
        let snapshot = Snapshot::prepare(message.clone(), None, Now::read(), 1).unwrap();
        let at = |after: std::time::Duration| {
            authenticate(
                &snapshot,
                &bearer("sk-one"),
                ApiFormat::OpenAi,
                expiry + after,
            )
            .map(|key| key.id.clone())
        };
        assert_eq!(at(std::time::Duration::from_secs(59)).unwrap(), "k1");
        assert!(matches!(at(EXPIRY_GRACE), Err(ProxyError::KeyExpired)));
        message.client_keys[0].expired = true;
        let flagged = Snapshot::prepare(message, None, Now::read(), 1).unwrap();
        assert!(matches!(
            authenticate(&flagged, &bearer("sk-one"), ApiFormat::OpenAi, expiry),
            Err(ProxyError::KeyExpired)
        ));
    }

    #[tokio::test]
    async fn a_cached_key_is_checked_against_each_snapshot() {
        let both = snapshot_with_keys(&[("k1", "sk-one"), ("k2", "sk-two")], Now::read());
        let only_two = snapshot_with_keys(&[("k2", "sk-two")], Now::read());
        for _ in 0..2 {
            assert_eq!(
                authenticate(
                    &both,
                    &bearer("sk-one"),
                    ApiFormat::OpenAi,
                    SystemTime::now()
                )
                .unwrap()
                .id,
                "k1"
            );
            assert_eq!(
                authenticate(
                    &both,
                    &bearer("sk-two"),
                    ApiFormat::OpenAi,
                    SystemTime::now()
                )
                .unwrap()
                .id,
                "k2"
            );
        }
        // Revoked in the newer snapshot: refused although this thread has it cached.
        assert!(matches!(
            authenticate(
                &only_two,
                &bearer("sk-one"),
                ApiFormat::OpenAi,
                SystemTime::now()
            ),
            Err(ProxyError::InvalidApiKey)
        ));
        assert_eq!(
            authenticate(
                &only_two,
                &bearer("sk-two"),
                ApiFormat::OpenAi,
                SystemTime::now()
            )
            .unwrap()
            .id,
            "k2"
        );
        // A key that only shares a prefix with a cached one, or is longer.
        for wrong in ["sk-on", "sk-one2", "sk-onf", ""] {
            assert!(
                authenticate(&both, &bearer(wrong), ApiFormat::OpenAi, SystemTime::now()).is_err(),
                "{wrong}"
            );
        }
        assert!(matches!(
            authenticate(
                &both,
                &HeaderMap::new(),
                ApiFormat::OpenAi,
                SystemTime::now()
            ),
            Err(ProxyError::MissingApiKey)
        ));
    }

    #[tokio::test]
    async fn anthropic_routes_also_take_the_key_in_x_api_key() {
        let snapshot = snapshot_with_keys(&[("k1", "sk-one"), ("k2", "sk-two")], Now::read());
        let mut headers = HeaderMap::new();
        headers.insert(X_API_KEY, "sk-one".parse().unwrap());
        assert_eq!(
            authenticate(&snapshot, &headers, ApiFormat::Anthropic, SystemTime::now())
                .unwrap()
                .id,
            "k1"
        );
        // Not on OpenAI's routes, whose clients never send it.
        assert!(matches!(
            authenticate(&snapshot, &headers, ApiFormat::OpenAi, SystemTime::now()),
            Err(ProxyError::MissingApiKey)
        ));
        // x-api-key wins over a bearer token; a bearer alone works on either route.
        headers.insert(header::AUTHORIZATION, "Bearer sk-two".parse().unwrap());
        let id = |format| {
            authenticate(&snapshot, &headers, format, SystemTime::now())
                .unwrap()
                .id
                .clone()
        };
        assert_eq!(id(ApiFormat::Anthropic), "k1");
        assert_eq!(id(ApiFormat::OpenAi), "k2");
        assert_eq!(
            authenticate(
                &snapshot,
                &bearer("sk-two"),
                ApiFormat::Anthropic,
                SystemTime::now()
            )
            .unwrap()
            .id,
            "k2"
        );
        for wrong in ["sk-on", "", "  "] {
            let mut headers = HeaderMap::new();
            headers.insert(X_API_KEY, wrong.parse().unwrap());
            assert!(matches!(
                authenticate(&snapshot, &headers, ApiFormat::Anthropic, SystemTime::now()),
                Err(ProxyError::InvalidApiKey)
            ));
            // Beside a bearer token naming a key (`ANTHROPIC_API_KEY` set empty, or to the
            // user's own Anthropic key, with the gateway's in `ANTHROPIC_AUTH_TOKEN`), the
            // bearer's key.
            headers.insert(header::AUTHORIZATION, "Bearer sk-two".parse().unwrap());
            assert_eq!(
                authenticate(&snapshot, &headers, ApiFormat::Anthropic, SystemTime::now())
                    .unwrap()
                    .id,
                "k2",
                "x-api-key: {wrong:?}"
            );
            headers.insert(header::AUTHORIZATION, "Bearer sk-tw".parse().unwrap());
            assert!(matches!(
                authenticate(&snapshot, &headers, ApiFormat::Anthropic, SystemTime::now()),
                Err(ProxyError::InvalidApiKey)
            ));
        }
    }

    #[tokio::test]
    async fn failed_keys_are_not_kept_and_the_cache_stays_bounded() {
        let snapshot = snapshot_with_keys(&[("k1", "sk-one")], Now::read());
        for i in 0..100 {
            assert!(
                authenticate(
                    &snapshot,
                    &bearer(&format!("sk-made-up-{i}")),
                    ApiFormat::OpenAi,
                    SystemTime::now()
                )
                .is_err()
            );
        }
        assert_eq!(KEY_HASHES.with_borrow(|h| h.entries.len()), 0);
        let many: Vec<(String, String)> = (0..CACHED_KEYS + 10)
            .map(|i| (format!("k{i}"), format!("sk-{i}")))
            .collect();
        let pairs: Vec<(&str, &str)> = many
            .iter()
            .map(|(id, k)| (id.as_str(), k.as_str()))
            .collect();
        let snapshot = snapshot_with_keys(&pairs, Now::read());
        for (id, key) in &pairs {
            assert_eq!(
                authenticate(
                    &snapshot,
                    &bearer(key),
                    ApiFormat::OpenAi,
                    SystemTime::now()
                )
                .unwrap()
                .id,
                *id
            );
        }
        assert!(KEY_HASHES.with_borrow(|h| h.entries.len()) <= CACHED_KEYS);
    }

    #[tokio::test]
    async fn an_expired_key_is_refused_as_expired_even_when_cached() {
        let live = snapshot_with_keys(&[("k1", "sk-one"), ("k2", "sk-two")], Now::read());
        assert_eq!(
            authenticate(
                &live,
                &bearer("sk-one"),
                ApiFormat::OpenAi,
                SystemTime::now()
            )
            .unwrap()
            .id,
            "k1"
        );
        let mut message = proto_with_keys(&[("k1", "sk-one"), ("k2", "sk-two")]);
        message.client_keys[0].expired = true;
        let expired = Snapshot::prepare(message, Some(&live), Now::read(), 1).unwrap();
        let err = authenticate(
            &expired,
            &bearer("sk-one"),
            ApiFormat::OpenAi,
            SystemTime::now(),
        )
        .unwrap_err();
        assert!(matches!(err, ProxyError::KeyExpired), "{err:?}");
        assert_eq!(err.status(), http::StatusCode::UNAUTHORIZED);
        let body: serde_json::Value = serde_json::from_slice(&err.body()).unwrap();
        assert_eq!(body["error"]["code"], "api_key_expired");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("expired"),
            "{body}"
        );
        // The other key is untouched, and a wrong key is still just wrong.
        assert_eq!(
            authenticate(
                &expired,
                &bearer("sk-two"),
                ApiFormat::OpenAi,
                SystemTime::now()
            )
            .unwrap()
            .id,
            "k2"
        );
        assert!(matches!(
            authenticate(
                &expired,
                &bearer("sk-three"),
                ApiFormat::OpenAi,
                SystemTime::now()
            ),
            Err(ProxyError::InvalidApiKey)
        ));
    }
}
