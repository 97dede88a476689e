//! The one mapping of each inner error to the gRPC status a client gets. A client is told
//! what it can act on (not found, already exists, invalid input, try again); a failure of
//! the control plane itself is answered without its cause, which the store logs where it
//! happens.

use tonic::Status;

use crate::ingest::IngestError;
use crate::snapshot::SnapshotTooLarge;
use crate::store::StoreError;
use crate::validation::ValidationError;

impl From<StoreError> for Status {
    fn from(err: StoreError) -> Self {
        match &err {
            StoreError::NotFound { .. } => Status::not_found(err.to_string()),
            StoreError::AlreadyExists(_) => Status::already_exists(err.to_string()),
            StoreError::Invalid(_) => Status::invalid_argument(err.to_string()),
            StoreError::Changed(_) => Status::aborted(err.to_string()),
            _ => Status::internal("internal storage error; see the control plane's log"),
        }
    }
}

/// `INVALID_ARGUMENT` with `"<field>: <problem>"`.
impl From<ValidationError> for Status {
    fn from(err: ValidationError) -> Self {
        Status::invalid_argument(err.to_string())
    }
}

/// `FAILED_PRECONDITION`: nothing to retry until keys or backends are removed.
impl From<SnapshotTooLarge> for Status {
    fn from(err: SnapshotTooLarge) -> Self {
        Status::failed_precondition(err.to_string())
    }
}

impl From<IngestError> for Status {
    fn from(err: IngestError) -> Self {
        match err {
            IngestError::Store => {
                Status::internal("storing usage failed; see the control plane's log")
            }
            IngestError::OutOfOrder(_) => Status::aborted(err.to_string()),
            IngestError::Closed => Status::unavailable(err.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn callers_learn_their_mistake_and_nothing_of_an_internal_failure() {
        let not_found = Status::from(StoreError::NotFound {
            kind: "backend",
            id: "b1".into(),
        });
        assert_eq!(not_found.code(), Code::NotFound);
        assert_eq!(not_found.message(), "backend \"b1\" not found");
        let invalid = Status::from(StoreError::Invalid(ValidationError::new("name", "is bad")));
        assert_eq!(invalid.code(), Code::InvalidArgument);
        assert_eq!(invalid.message(), "name: is bad");
        let internal = Status::from(StoreError::Corrupt("/var/lib/sluice/sluice.db".into()));
        assert_eq!(internal.code(), Code::Internal);
        assert!(!internal.message().contains("/var/lib"));
        assert_eq!(Status::from(IngestError::Closed).code(), Code::Unavailable);
        let gap = Status::from(IngestError::OutOfOrder(crate::store::OutOfOrder {
            previous: 10,
            held: 4,
        }));
        assert_eq!(gap.code(), Code::Aborted);
        assert!(gap.message().contains("up to 4"), "{}", gap.message());
    }
}
