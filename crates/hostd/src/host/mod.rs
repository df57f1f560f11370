//! The host runtime: runs pods detached from any terminal, as the host
//! daemon (`podvisor host`) asks.
//!
//! Each pod is one VM with all its containers, supervised by its own task
//! ([`pod_task`]), which drives it through the [`sandbox`] seam (pod VMs:
//! [`vm_sandbox`]; `ack-without-vm`: [`ack_sandbox`]): images come from
//! the global cache ([`images`]), container output goes to size-bounded,
//! rotated log files that can be followed ([`logs`]), containers are
//! restarted as their pod's restart policy says, with Kubernetes'
//! crash-loop back-off ([`status`]), and exec sessions run processes inside
//! running containers. Deleting a pod stops its containers with a grace
//! period, powers the VM off and removes its files.
//!
//! VMs outlive the daemon: each is launched in its own session and recorded
//! in the state directory ([`records`]); a restarted daemon adopts the VMs
//! it finds recorded ([`PodRuntime::open`]) instead of starting duplicates,
//! and stops VMs nothing records. [`PodRuntime`] is the daemon's handle on
//! all of it.
//!
//! With [`HostConfig::network`] set, each pod also gets a network
//! ([`podvisor_net`], through [`vm_sandbox`]): attached at its first VM
//! start, kept across restarts and adoptions of its VM (each new VM gets a
//! fresh tap in the same namespace), detached when the pod is deleted or
//! has finished; at start-up and every [`NETWORK_RECONCILE_PERIOD`] the
//! attachments of pods that are gone are removed.
//!
//! Pods are hibernated on request or after their idle time
//! ([`hibernation`], [`pod_sleep`]): the VM saved into a sealed snapshot in
//! the pod's directory, its key handed to the management server, the QEMU
//! gone; the first request for the pod, an exec, a log follower or a wake
//! command brings it back.

pub mod ack_sandbox;
mod error;
mod exec;
#[cfg(test)]
pub(crate) mod fake_sandbox;
pub mod hibernation;
#[cfg(test)]
mod hibernation_tests;
pub mod images;
pub mod jvm_archive;
pub mod logs;
pub mod plan;
mod pod_events;
pub mod pod_sleep;
mod pod_state;
pub mod pod_task;
mod pod_volumes;
pub mod private_files;
pub mod records;
pub mod runtime;
pub mod runtime_sizing;
pub mod sandbox;
pub mod server_call;
mod state_changes;
pub mod status;
#[cfg(test)]
pub(crate) mod tests;
pub mod vm_sandbox;
#[cfg(test)]
mod volume_tests;
pub mod volumes;

pub use ack_sandbox::AckLauncher;
pub use error::RuntimeError;
pub use exec::{
    EXEC_EVENT_BACKLOG, EXEC_OUTPUT_BACKLOG, ExecEvent, ExecEvents, ExecInput, ExecRequest,
    ExecSession,
};
pub use plan::{ContainerPlan, PodPlan, RestartPolicy};
pub use records::{HostRecord, PodRecord, StateDir};
pub use runtime::{ChangeFeed, PodRuntime};
pub use sandbox::{Launcher, Prepared, Sandbox};
pub use status::{
    Backoff, ContainerState, ContainerStatus, PodPhase, PodReason, PodState, TerminatedReason,
    WaitingReason,
};
pub use vm_sandbox::VmLauncher;

use std::path::PathBuf;
use std::time::Duration;

use podvisor_net::pod_network::PodNetworkConfig;
use podvisor_podvm::NodeConfig;

/// How often attachments of pods that are gone (or finished) are removed.
pub const NETWORK_RECONCILE_PERIOD: Duration = Duration::from_secs(60);

/// Settings of the host runtime.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Cache, kernel, agent, accelerator, boot timeout.
    pub node: NodeConfig,
    /// Records, logs and VM run directories.
    pub state_dir: PathBuf,
    /// Size limit of one container log file.
    pub log_max_bytes: u64,
    /// Crash-loop back-off of container restarts (and of retried pulls and
    /// boots).
    pub backoff: Backoff,
    /// Grace period between SIGTERM and SIGKILL when a pod is deleted
    /// (Kubernetes' default is 30 s).
    pub delete_grace: Duration,
    /// Pod networking (CNI): each pod gets a network namespace and an
    /// address at its first VM start, kept across VM restarts, removed
    /// when the pod is deleted or finished. `None`: pods have only `lo`
    /// and cannot publish host ports.
    pub network: Option<PodNetworkConfig>,
    /// How long a wake from hibernation may take before the pod is
    /// restarted cold instead.
    pub wake_timeout: Duration,
    /// Where persistent volumes' data files and encrypted volumes' format
    /// images are kept.
    pub volume_dirs: volumes::VolumeDirs,
    /// How long the key release of a start's encrypted volumes may take
    /// before the containers waiting for it are left with `KeyTimeout`.
    pub key_timeout: Duration,
    /// How long a JVM training run warms up before its class-data archive
    /// is dumped; `None`: this host makes and uses no JVM archives.
    pub jvm_archive_warm_up: Option<Duration>,
    /// Mark the guest RAM of pods that do not ask for isolation mergeable
    /// (QEMU's `mem-merge=on`), for a host that runs KSM (`podvisor host
    /// --ksm`, which sets it). Off: no pod's RAM is merged, whoever turns
    /// KSM on.
    pub memory_merge: bool,
}

impl HostConfig {
    /// Defaults for everything but the node settings and the state directory.
    pub fn new(node: NodeConfig, state_dir: PathBuf) -> Self {
        Self {
            node,
            log_max_bytes: logs::DEFAULT_MAX_BYTES,
            backoff: Backoff::default(),
            delete_grace: Duration::from_secs(30),
            network: None,
            wake_timeout: Duration::from_secs(30),
            key_timeout: Duration::from_secs(60),
            jvm_archive_warm_up: Some(Duration::from_secs(20)),
            memory_merge: false,
            volume_dirs: volumes::VolumeDirs {
                volumes: state_dir.join("volumes"),
                format_images: state_dir.join("volume-format-images"),
            },
            state_dir,
        }
    }
}
