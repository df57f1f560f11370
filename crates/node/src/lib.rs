//! The host side of podvisor: runs a pod as a VM and drives its agent.
//!
//! [`pod::run`] takes a pod request (image, resources, overrides), gets the
//! image's layer disks from the global cache, pulling or importing what is
//! missing and holding them in the catalog while the pod runs
//! ([`image_source`], [`podvisor_image`]), prepares the guest boot
//! artifacts ([`podvisor_guest`]), launches the VM through the hypervisor
//! trait ([`podvisor_vmm`]), and then talks to the agent over
//! [`agent_link`]: it starts the container, relays stdio, signals and
//! terminal resizes, and reports how the container ended, with the time of
//! each stage. Terminal handling and output formatting belong to the CLI.

pub mod agent_link;
pub mod config;
pub mod container;
pub mod daemon;
pub mod host;
pub mod image_source;
pub mod pod;
pub mod pod_fork;
pub mod pod_vm;
pub mod templates;
pub mod timings;

pub use config::NodeConfig;
pub use container::ContainerOverrides;
pub use image_source::{ImageSource, PodImage, prepare_image};
pub use pod::{Control, Outcome, PodIo, PodRequest, RunReport, run};
pub use pod_vm::{PodVm, PodVmSpec, RestoreSpec};
pub use templates::{TemplateChoice, TemplateError};
pub use timings::Timings;

use std::time::Duration;

/// Errors of running a pod.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Image(#[from] podvisor_image::ImageError),
    #[error(transparent)]
    Guest(#[from] podvisor_guest::GuestError),
    #[error(transparent)]
    Vmm(#[from] podvisor_vmm::VmmError),
    #[error(transparent)]
    Spec(#[from] container::ContainerSpecError),
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
    #[error("the guest broke the agent protocol, so its VM was killed: {0}")]
    HostileGuest(agent_link::AgentLinkError),
    #[error("agent channel: {0}")]
    Link(agent_link::AgentLinkError),
    #[error(transparent)]
    Template(Box<templates::TemplateError>),
    #[error("the clone could not take on its own identity: {}", .0.join("; "))]
    Identity(Vec<String>),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}
