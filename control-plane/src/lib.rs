//! Sluice control plane library.
