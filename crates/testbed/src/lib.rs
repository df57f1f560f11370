//! Test fixtures for podvisor, used only as a dev-dependency: scratch
//! directories and a `podvisor` command builder ([`cli`]), OCI images built
//! from the host's busybox with no network ([`oci`]), a real etcd server
//! on loopback ([`etcd`]), a real registry to push images to ([`registry`])
//! and a slow proxy in front of it ([`throttle`]), and emulated hosts in
//! network namespaces routed to each other ([`fabric`]), and one emulated host
//! for a pod-network test ([`net_host`]).

/// Scratch directories and the `podvisor` command builder.
pub mod cli;

/// Background processes (servers, host daemons), free ports.
pub mod daemon;

/// An emulated host (network + mount namespace) for pod-network tests.
pub mod net_host;

/// OCI images built from scratch for tests (layers, layouts, archives).
pub mod oci;

/// Layers of the host's own runtimes (JDK, Node.js, CPython) for images.
pub mod host_layer;

/// A Java HTTP server image (the host's JDK and a jar built here).
pub mod java;

/// A real etcd server (Debian's etcd-server) on 127.0.0.1 for store tests.
pub mod etcd;

/// A real registry (Debian's docker-registry) on loopback, with its access log.
pub mod registry;

/// A rate-limiting TCP proxy, to slow a pull down.
pub mod throttle;

/// A bearer-token service for a registry with token auth.
pub mod token_issuer;

/// Emulated hosts in network namespaces routed to each other, for
/// multi-host network tests.
pub mod fabric;
