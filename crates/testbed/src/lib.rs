//! Test fixtures for podvisor, used only as a dev-dependency: scratch
//! directories and a `podvisor` command builder ([`cli`]), and OCI images
//! built from the host's busybox with no network ([`oci`]).

/// Scratch directories and the `podvisor` command builder.
pub mod cli;

/// OCI images built from scratch for tests (layers, layouts, archives).
pub mod oci;
