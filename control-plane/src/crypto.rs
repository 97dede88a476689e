//! Encryption of provider API keys at rest: XChaCha20-Poly1305 under a 32-byte
//! master key, a fresh random 24-byte nonce per encryption, and the owning row's
//! id as associated data so a ciphertext cannot be moved to another backend.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

const NONCE_LEN: usize = 24;

/// Associated data of the value that proves which master key a database was written with.
pub const CHECK_AAD: &[u8] = b"sluice:master-key-check";
const CHECK_PLAINTEXT: &[u8] = b"sluice master key check v1";

/// Why a master key or a ciphertext was refused.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("master key must be base64 of exactly 32 bytes")]
    BadMasterKey,
    #[error("ciphertext is too short")]
    Truncated,
    #[error("decryption failed: wrong master key, wrong owner or tampered ciphertext")]
    Decrypt,
    #[error("encryption failed")]
    Encrypt,
}

/// The 32-byte key that encrypts every provider key. Its bytes never leave this type
/// except through [`MasterKey::to_base64`], used only to write the generated key file.
#[derive(Clone)]
pub struct MasterKey {
    cipher: XChaCha20Poly1305,
    raw: [u8; 32],
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl MasterKey {
    pub fn generate() -> Self {
        let key = XChaCha20Poly1305::generate_key(&mut OsRng);
        let mut raw = [0u8; 32];
        raw.copy_from_slice(&key);
        Self::from_bytes(raw)
    }

    pub fn from_bytes(raw: [u8; 32]) -> Self {
        Self {
            cipher: XChaCha20Poly1305::new(&raw.into()),
            raw,
        }
    }

    /// Parses base64 (standard alphabet, surrounding whitespace ignored) of 32 bytes.
    pub fn from_base64(text: &str) -> Result<Self, CryptoError> {
        let bytes = BASE64
            .decode(text.trim())
            .map_err(|_| CryptoError::BadMasterKey)?;
        let raw: [u8; 32] = bytes.try_into().map_err(|_| CryptoError::BadMasterKey)?;
        Ok(Self::from_bytes(raw))
    }

    pub fn to_base64(&self) -> String {
        BASE64.encode(self.raw)
    }

    /// Returns `nonce || ciphertext+tag`.
    pub fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let sealed = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| CryptoError::Encrypt)?;
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    pub fn decrypt(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if sealed.len() < NONCE_LEN + 16 {
            return Err(CryptoError::Truncated);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        self.cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .map_err(|_| CryptoError::Decrypt)
    }

    /// A value stored once per database; [`MasterKey::verify_check`] tells whether a
    /// key is the one the database was written with.
    pub fn make_check(&self) -> Result<Vec<u8>, CryptoError> {
        self.encrypt(CHECK_PLAINTEXT, CHECK_AAD)
    }

    pub fn verify_check(&self, check: &[u8]) -> bool {
        matches!(self.decrypt(check, CHECK_AAD), Ok(plain) if plain == CHECK_PLAINTEXT)
    }
}

/// The last four characters of a key, shown in listings so an operator can tell keys apart.
pub fn key_hint(api_key: &str) -> String {
    let chars: Vec<char> = api_key.chars().collect();
    if chars.len() < 8 {
        // Too short to show any part of it without giving most of it away.
        return String::new();
    }
    chars[chars.len() - 4..].iter().collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn round_trip_with_fresh_nonces() {
        let key = MasterKey::generate();
        let a = key.encrypt(b"sk-secret", b"backend-1").unwrap();
        let b = key.encrypt(b"sk-secret", b"backend-1").unwrap();
        assert_ne!(a, b, "each encryption must use a fresh nonce");
        assert_eq!(key.decrypt(&a, b"backend-1").unwrap(), b"sk-secret");
        assert!(!a.windows(9).any(|w| w == b"sk-secret"));
    }

    #[test]
    fn tampering_is_detected() {
        let key = MasterKey::generate();
        let mut sealed = key.encrypt(b"sk-secret", b"backend-1").unwrap();
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert!(matches!(
            key.decrypt(&sealed, b"backend-1"),
            Err(CryptoError::Decrypt)
        ));
        sealed[last] ^= 1;
        sealed[3] ^= 0x80; // the nonce
        assert!(key.decrypt(&sealed, b"backend-1").is_err());
        assert!(matches!(
            key.decrypt(&sealed[..10], b"backend-1"),
            Err(CryptoError::Truncated)
        ));
    }

    #[test]
    fn wrong_associated_data_is_refused() {
        let key = MasterKey::generate();
        let sealed = key.encrypt(b"sk-secret", b"backend-1").unwrap();
        assert!(key.decrypt(&sealed, b"backend-2").is_err());
    }

    #[test]
    fn wrong_master_key_is_detected_by_the_check_value() {
        let key = MasterKey::generate();
        let check = key.make_check().unwrap();
        assert!(key.verify_check(&check));
        assert!(!MasterKey::generate().verify_check(&check));
    }

    #[test]
    fn base64_parsing() {
        let key = MasterKey::generate();
        let again = MasterKey::from_base64(&format!(" {}\n", key.to_base64())).unwrap();
        let sealed = key.encrypt(b"x", b"a").unwrap();
        assert_eq!(again.decrypt(&sealed, b"a").unwrap(), b"x");
        assert!(MasterKey::from_base64("c2hvcnQ=").is_err());
        assert!(MasterKey::from_base64("not base64!").is_err());
        assert_eq!(format!("{key:?}"), "MasterKey(<redacted>)");
    }

    #[test]
    fn hints_show_only_the_last_four() {
        assert_eq!(key_hint("sk-abcdefgh1234"), "1234");
        assert_eq!(key_hint("short"), "");
    }
}
