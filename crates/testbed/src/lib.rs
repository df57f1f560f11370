//! placeholder

/// OCI images built from scratch for tests (layers, layouts, archives).
pub mod oci;
