//! Sluice data plane library.
