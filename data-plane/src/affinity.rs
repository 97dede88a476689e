//! Response ids that carry their own routing: the Responses API keeps state at the provider
//! (`previous_response_id`, `GET /v1/responses/{id}`, …), so a later call must reach the
//! backend that created the response, from any replica, with no table shared between them.
//!
//! The id Sluice hands out is `resp_` and the URL-safe base64 of
//! `version ‖ key id ‖ backend id ‖ model ‖ upstream id ‖ tag`, where the tag is the first
//! 16 bytes of HMAC-SHA256 over everything before it and the client key's id, under a secret
//! the control plane generates and sends every replica in the snapshot. So any replica can
//! read an id and restore the upstream's own; nobody without the secret can make one that
//! names another backend; and an id works only with the client key it was issued to.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use sluice_proto::v1 as proto;

type HmacSha256 = Hmac<Sha256>;

/// The prefix every Responses API id has; Sluice's keep it so clients that look at it are
/// not surprised.
const PREFIX: &str = "resp_";
const VERSION: u8 = 1;
const KEY_ID_BYTES: usize = 4;
const TAG_BYTES: usize = 16;
/// Longest id accepted from a client (far above any id Sluice issues).
pub const MAX_ID_BYTES: usize = 2048;

/// Why an id was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Not in Sluice's format, altered, issued to another client key, or signed with a key
    /// that has been retired (indistinguishable on purpose: the answer tells a guesser
    /// nothing).
    #[error("not a response id this gateway issued to this key, or altered")]
    Invalid,
    /// The snapshot has no affinity key: the control plane is older than this replica.
    #[error("no affinity key in the snapshot")]
    NoKey,
}

/// What an id says, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Affinity {
    pub backend_id: String,
    /// The public model name the response was created with ("" if it was too long to carry).
    pub model: String,
    /// The upstream's own id, to send it.
    pub upstream_id: String,
}

/// The affinity keys of one snapshot: the first signs, all verify.
#[derive(Clone, Default)]
pub struct AffinityKeys {
    signing: Option<(u32, HmacSha256)>,
    verifying: HashMap<u32, HmacSha256>,
}

impl std::fmt::Debug for AffinityKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ids: Vec<u32> = self.verifying.keys().copied().collect();
        ids.sort_unstable();
        f.debug_struct("AffinityKeys")
            .field("signing", &self.signing.as_ref().map(|(id, _)| id))
            .field("ids", &ids)
            .finish()
    }
}

impl AffinityKeys {
    /// From the snapshot's keys, newest first. A key that is not 32 bytes is refused.
    pub fn from_proto(keys: &[proto::AffinityKey]) -> Result<Self, u32> {
        let mut out = Self::default();
        for key in keys {
            if key.secret.len() != 32 {
                return Err(key.id);
            }
            let mac = HmacSha256::new_from_slice(&key.secret).map_err(|_| key.id)?;
            if out.signing.is_none() {
                out.signing = Some((key.id, mac.clone()));
            }
            out.verifying.insert(key.id, mac);
        }
        Ok(out)
    }

    /// Sluice's id for the upstream's `upstream_id`, created on `backend_id` for
    /// `client_key_id`.
    pub fn wrap(
        &self,
        client_key_id: &str,
        backend_id: &str,
        model: &str,
        upstream_id: &str,
    ) -> Result<String, IdError> {
        let (key_id, mac) = self.signing.as_ref().ok_or(IdError::NoKey)?;
        // A model name past 255 bytes is not carried (the record then says `other`).
        let model = if model.len() <= usize::from(u8::MAX) {
            model
        } else {
            ""
        };
        let backend = u8::try_from(backend_id.len()).map_err(|_| IdError::Invalid)?;
        let mut payload = Vec::with_capacity(
            1 + KEY_ID_BYTES + 2 + backend_id.len() + model.len() + upstream_id.len() + TAG_BYTES,
        );
        payload.push(VERSION);
        payload.extend_from_slice(&key_id.to_be_bytes());
        payload.push(backend);
        payload.extend_from_slice(backend_id.as_bytes());
        payload.push(model.len() as u8);
        payload.extend_from_slice(model.as_bytes());
        payload.extend_from_slice(upstream_id.as_bytes());
        let tag = tag(mac, client_key_id, &payload);
        payload.extend_from_slice(&tag[..TAG_BYTES]);
        let mut id = String::with_capacity(PREFIX.len() + payload.len() * 4 / 3 + 4);
        id.push_str(PREFIX);
        URL_SAFE_NO_PAD.encode_string(&payload, &mut id);
        Ok(id)
    }

    /// Authenticates an id a client presented with `client_key_id` and reads it.
    pub fn unwrap(&self, client_key_id: &str, id: &str) -> Result<Affinity, IdError> {
        if self.verifying.is_empty() {
            return Err(IdError::NoKey);
        }
        let encoded = id
            .strip_prefix(PREFIX)
            .filter(|_| id.len() <= MAX_ID_BYTES)
            .ok_or(IdError::Invalid)?;
        let payload = URL_SAFE_NO_PAD
            .decode(encoded)
            .map_err(|_| IdError::Invalid)?;
        let invalid = IdError::Invalid;
        let (signed, given) = payload
            .split_at_checked(payload.len().checked_sub(TAG_BYTES).ok_or(invalid)?)
            .ok_or(invalid)?;
        let (&version, rest) = signed.split_first().ok_or(invalid)?;
        if version != VERSION {
            return Err(invalid);
        }
        let (key_id, rest) = rest.split_at_checked(KEY_ID_BYTES).ok_or(invalid)?;
        let key_id = u32::from_be_bytes(key_id.try_into().map_err(|_| invalid)?);
        let mac = self.verifying.get(&key_id).ok_or(invalid)?;
        let mut check = mac.clone();
        check.update(&context(client_key_id));
        check.update(signed);
        check.verify_truncated_left(given).map_err(|_| invalid)?;
        let (backend, rest) = take_field(rest).ok_or(invalid)?;
        let (model, upstream) = take_field(rest).ok_or(invalid)?;
        let text = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).map_err(|_| invalid);
        Ok(Affinity {
            backend_id: text(backend)?,
            model: text(model)?,
            upstream_id: text(upstream)?,
        })
    }

    /// Whether the snapshot had any key (a replica without one serves no Responses API).
    pub fn is_empty(&self) -> bool {
        self.signing.is_none()
    }
}

/// The client key's id, length-prefixed so that no two (key, payload) pairs sign the same
/// bytes.
fn context(client_key_id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(client_key_id.len() + 24);
    out.extend_from_slice(b"sluice response id\0");
    out.extend_from_slice(&(client_key_id.len() as u32).to_be_bytes());
    out.extend_from_slice(client_key_id.as_bytes());
    out
}

fn tag(mac: &HmacSha256, client_key_id: &str, payload: &[u8]) -> [u8; 32] {
    let mut mac = mac.clone();
    mac.update(&context(client_key_id));
    mac.update(payload);
    mac.finalize().into_bytes().into()
}

/// A one-byte length and that many bytes; the rest.
fn take_field(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (&len, rest) = bytes.split_first()?;
    rest.split_at_checked(usize::from(len))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    fn keys(ids_and_bytes: &[(u32, u8)]) -> AffinityKeys {
        let keys: Vec<proto::AffinityKey> = ids_and_bytes
            .iter()
            .map(|&(id, b)| proto::AffinityKey {
                id,
                secret: vec![b; 32],
            })
            .collect();
        AffinityKeys::from_proto(&keys).unwrap()
    }

    const UPSTREAM: &str = "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b";

    #[test]
    fn an_id_round_trips_for_its_key_only() {
        let ring = keys(&[(2, 7)]);
        let id = ring.wrap("key-a", "backend-1", "gpt-4o", UPSTREAM).unwrap();
        assert!(id.starts_with("resp_"), "{id}");
        assert!(!id.contains(UPSTREAM));
        assert_eq!(
            ring.unwrap("key-a", &id).unwrap(),
            Affinity {
                backend_id: "backend-1".into(),
                model: "gpt-4o".into(),
                upstream_id: UPSTREAM.into(),
            }
        );
        // Another client key cannot use it, and the upstream's bare id is not one of ours.
        assert_eq!(ring.unwrap("key-b", &id), Err(IdError::Invalid));
        assert_eq!(ring.unwrap("key-a", UPSTREAM), Err(IdError::Invalid));
        // A replica with another secret refuses it; one holding no key says so.
        assert_eq!(keys(&[(2, 8)]).unwrap("key-a", &id), Err(IdError::Invalid));
        assert_eq!(
            AffinityKeys::default().unwrap("key-a", &id),
            Err(IdError::NoKey)
        );
    }

    #[test]
    fn after_a_rotation_old_ids_still_verify_until_their_key_is_retired() {
        let old = keys(&[(1, 1)]);
        let id = old.wrap("k", "b", "m", UPSTREAM).unwrap();
        let rotated = keys(&[(2, 2), (1, 1)]);
        assert_eq!(rotated.unwrap("k", &id).unwrap().upstream_id, UPSTREAM);
        let fresh = rotated.wrap("k", "b", "m", UPSTREAM).unwrap();
        assert_ne!(fresh, id, "the newest key signs");
        let retired = keys(&[(2, 2)]);
        assert_eq!(retired.unwrap("k", &id), Err(IdError::Invalid));
        assert!(retired.unwrap("k", &fresh).is_ok());
    }

    #[test]
    fn a_secret_of_the_wrong_size_is_refused() {
        let bad = [proto::AffinityKey {
            id: 3,
            secret: vec![0; 31],
        }];
        assert_eq!(AffinityKeys::from_proto(&bad).unwrap_err(), 3);
    }

    proptest! {
        /// Any change to an id (a flipped character, a cut, an addition) is refused: the
        /// backend it names cannot be steered.
        #[test]
        fn every_altered_id_is_refused(at in 0usize..200, by in 1u8..63, cut in 0usize..200) {
            let ring = keys(&[(1, 9)]);
            let id = ring.wrap("k", "0193c0de-0000-7000-8000-000000000001", "gpt-4o-mini", UPSTREAM).unwrap();
            let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let mut flipped = id.clone().into_bytes();
            let i = 5 + at % (flipped.len() - 5);
            let pos = alphabet.iter().position(|c| *c == flipped[i]).unwrap();
            flipped[i] = alphabet[(pos + usize::from(by)) % 64];
            let flipped = String::from_utf8(flipped).unwrap();
            // Changing the last character may only touch base64 padding bits.
            if flipped != id && URL_SAFE_NO_PAD.decode(&flipped[5..]).ok() != URL_SAFE_NO_PAD.decode(&id[5..]).ok() {
                prop_assert_eq!(ring.unwrap("k", &flipped), Err(IdError::Invalid));
            }
            let cut_at = 5 + cut % (id.len() - 5);
            prop_assert_eq!(ring.unwrap("k", &id[..cut_at]), Err(IdError::Invalid));
            prop_assert_eq!(ring.unwrap("k", &format!("{id}A")), Err(IdError::Invalid));
        }
    }
}
