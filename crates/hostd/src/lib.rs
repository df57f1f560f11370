//! The host side of a cluster: the host runtime ([`host`]) keeps the pods
//! assigned to this machine running as pod VMs, restarts their containers
//! per restart policy, keeps their logs and status, and adopts the pod VMs
//! a previous host process left running; the host daemon ([`daemon`])
//! registers the host with the management server, follows the pods
//! assigned to it, hands them to the host runtime, reports their status,
//! and serves their logs and exec sessions over HTTP. The only host-side
//! crate linking the API client and axum.

pub mod daemon;
pub mod host;
