//! The one error type for refused input, carrying the field it is about so that
//! both gRPC clients and the dashboard can show it beside the field.

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

/// A name shown to operators: 1 to 64 characters, no control characters, not blank.
pub fn check_name(field: &str, name: &str) -> Result<(), ValidationError> {
    if name.trim().is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if name.chars().count() > 64 {
        return Err(ValidationError::new(field, "must be at most 64 characters"));
    }
    if name.chars().any(char::is_control) {
        return Err(ValidationError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}
