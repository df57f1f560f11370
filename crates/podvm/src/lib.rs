//! A pod VM: one QEMU VM running podvisor's agent, seen from the host.
//!
//! [`PodVm`] boots a VM from guest boot artifacts ([`podvisor_guest`])
//! through the hypervisor trait ([`podvisor_vmm`]), adopts one a previous
//! host process left running, or loads one from a saved state (and gives
//! a template's clone its own identity, a separate step); then it talks to
//! the agent over
//! [`agent_link`] (send a message, wait for the next event, shut down,
//! kill, detach). Also here, because every user of a pod VM needs them:
//! the host settings ([`NodeConfig`]), building a container's spec from its
//! image config and the user's overrides ([`container`]), the layer disks
//! as VM devices on a [`LayerBus`] ([`layer_devices`], [`layer_mounts`];
//! the images themselves come from
//! [`podvisor_image::acquire()`] through [`NodeConfig::open_images`]), the
//! time of each stage ([`Timings`]), and a pod VM's NIC and the network
//! configuration its agent applies ([`network`]). What runs in a pod VM and for how
//! long belongs to the crates above: `podvisor-run` (one container, the
//! user's stdio), `podvisor-template` (templates, fork) and
//! `podvisor-hostd` (the host runtime).

pub mod agent_link;
pub mod config;
pub mod container;
pub mod image_boot;
pub mod network;
pub mod pod_vm;
pub mod timings;

pub use config::NodeConfig;
pub use container::{
    ContainerOverrides, LayerBus, layer_devices, layer_disks, layer_mounts, layer_pmems,
};
pub use pod_vm::{LoadSpec, PodVm, PodVmSpec};
pub use timings::Timings;

use std::time::Duration;

/// Errors of starting and driving a pod VM.
#[derive(Debug, thiserror::Error)]
pub enum PodVmError {
    #[error(transparent)]
    Image(#[from] podvisor_image::ImageError),
    #[error(transparent)]
    Guest(#[from] podvisor_guest::GuestError),
    #[error(transparent)]
    Vmm(#[from] podvisor_vmm::VmmError),
    #[error(transparent)]
    Spec(#[from] container::ContainerSpecError),
    #[error(transparent)]
    Random(#[from] podvisor_store::RandomError),
    #[error("the pod VM did not become ready within {timeout:?}; console tail:\n{console_tail}")]
    BootTimeout {
        timeout: Duration,
        console_tail: String,
    },
    #[error("the pod VM exited unexpectedly ({exit:?}); console tail:\n{console_tail}")]
    VmDied {
        exit: podvisor_vmm::VmExit,
        console_tail: String,
    },
    #[error("the guest broke the agent protocol, so its VM was killed")]
    HostileGuest(#[source] agent_link::AgentLinkError),
    #[error("agent channel")]
    Link(#[source] agent_link::AgentLinkError),
    #[error("the clone could not take on its own identity: {}", .0.join("; "))]
    Identity(Vec<String>),
    #[error("configuring the pod's network in the guest: {0}")]
    Network(String),
    /// The pod's network (CNI, its namespace, the tap) could not be set up.
    #[error(transparent)]
    PodNetwork(#[from] podvisor_net::pod_network::PodNetworkError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}
