//! The one error type for refused input, carrying the field it is about so that
//! both gRPC clients and the dashboard can show it beside the field, and the rules
//! every name obeys.

use sluice_domain::text::quoted;
use sluice_proto::limits::MAX_MODEL_NAME_BYTES;

/// Input that breaks a rule. Maps to `INVALID_ARGUMENT` with the message
/// `"<field>: <problem>"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The largest `tpm_limit` of a key or a backend: a billion tokens a minute, far above any
/// provider's quota, and small enough that one token's share of a minute stays above a
/// nanosecond at any replica count.
pub const MAX_TPM_LIMIT: u32 = 1_000_000_000;

/// A tokens-per-minute limit as given at `field`, checked against [`MAX_TPM_LIMIT`].
pub fn check_tpm_limit(field: &str, tpm_limit: u32) -> Result<(), ValidationError> {
    if tpm_limit > MAX_TPM_LIMIT {
        return Err(ValidationError::new(
            field,
            format!("must be at most {MAX_TPM_LIMIT} tokens per minute (0 means no limit)"),
        ));
    }
    Ok(())
}

/// An `update_mask` path that names no field the update may change.
pub fn not_updatable(path: &str, updatable: &[&str]) -> ValidationError {
    ValidationError::new(
        "update_mask",
        format!(
            "unknown or read-only field {:?}; updatable: {}",
            quoted(path),
            updatable.join(", ")
        ),
    )
}

/// A name shown to operators: 1 to 64 characters, not blank, no control or invisible
/// formatting characters, and not something that reads as an id (the admin API takes
/// an id or a name wherever it names a backend or key, so a name must never be both).
pub use sluice_domain::text::canonical_name;

pub fn check_name(field: &str, name: &str) -> Result<(), ValidationError> {
    if name.trim().is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if name.chars().count() > 64 {
        return Err(ValidationError::new(field, "must be at most 64 characters"));
    }
    check_visible(field, name)?;
    if uuid::Uuid::try_parse(name).is_ok() {
        return Err(ValidationError::new(
            field,
            "must not be an id: ids and names are both accepted where a backend or key is named",
        ));
    }
    Ok(())
}

/// A model name as clients send it (a route's public name, an allow-list entry): 1 to
/// [`MAX_MODEL_NAME_BYTES`] bytes, no spaces, no control or invisible formatting characters.
pub fn check_model_name(field: &str, name: &str) -> Result<(), ValidationError> {
    if name.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if name.len() > MAX_MODEL_NAME_BYTES {
        return Err(ValidationError::new(
            field,
            format!("model names must be at most {MAX_MODEL_NAME_BYTES} bytes"),
        ));
    }
    if name.chars().any(char::is_whitespace) {
        return Err(ValidationError::new(field, "must not contain spaces"));
    }
    check_visible(field, name)
}

/// No control characters and no Unicode format characters (category Cf: zero-width
/// spaces and joiners, bidirectional overrides, soft hyphens…), which make two different
/// names look the same or a name look like something else.
pub fn check_visible(field: &str, text: &str) -> Result<(), ValidationError> {
    if sluice_domain::text::has_control(text) {
        return Err(ValidationError::new(
            field,
            "must not contain control characters",
        ));
    }
    if let Some(c) = text.chars().find(|&c| sluice_domain::text::is_format(c)) {
        return Err(ValidationError::new(
            field,
            format!(
                "must not contain invisible formatting characters (found U+{:04X})",
                u32::from(c)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn names_refuse_invisible_characters_and_ids() {
        assert!(check_name("name", "openai-main").is_ok());
        assert!(check_name("name", "Équipe données ✓").is_ok());
        assert_eq!(canonical_name(" cafe\u{301} "), "caf\u{e9}");
        assert_eq!(canonical_name("caf\u{e9}"), "caf\u{e9}");
        assert_eq!(canonical_name("openai-main"), "openai-main");
        for (name, why) in [
            ("open\u{200B}ai", "U+200B"),     // zero-width space
            ("ab\u{202E}cd", "U+202E"),       // right-to-left override
            ("\u{2066}x\u{2069}", "U+2066"),  // isolates
            ("soft\u{00AD}hyphen", "U+00AD"), // soft hyphen
            ("bom\u{FEFF}", "U+FEFF"),        // zero-width no-break space
            ("tag\u{E0041}", "U+E0041"),      // tag character
        ] {
            let err = check_name("name", name).unwrap_err();
            assert!(err.message.contains(why), "{name:?}: {err}");
        }
        assert!(check_name("name", "a\u{1b}[31mred").is_err());
        for id in [
            "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
            "0190A1B2-C3D4-7E5F-8A9B-0C1D2E3F4A5B",
            "0190a1b2c3d47e5f8a9b0c1d2e3f4a5b",
            "{0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b}",
        ] {
            let err = check_name("name", id).unwrap_err();
            assert!(err.message.contains("must not be an id"), "{id}: {err}");
        }
    }

    #[test]
    fn model_names_are_bounded_and_visible() {
        assert!(check_model_name("m", "gpt-4o-mini").is_ok());
        assert!(check_model_name("m", &"m".repeat(MAX_MODEL_NAME_BYTES)).is_ok());
        assert!(check_model_name("m", &"m".repeat(MAX_MODEL_NAME_BYTES + 1)).is_err());
        assert!(check_model_name("m", "").is_err());
        assert!(check_model_name("m", "a b").is_err());
        assert!(check_model_name("m", "gpt\u{200D}4").is_err());
    }
}
