//! Mock provider and e2e harness.
