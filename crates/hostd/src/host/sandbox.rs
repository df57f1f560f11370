//! The seam between a pod's task and what its containers run in: a
//! [`Sandbox`] (one pod VM, or nothing at all for `ack-without-vm`) and the
//! [`Launcher`] that prepares, starts, adopts and discards them. The pod
//! task speaks the agent protocol ([`podvisor_proto`]) to its sandbox and
//! knows nothing else of VMs, so it runs as well against a fake in unit
//! tests.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use podvisor_hibernate::{HibernateError, Snapshot, SnapshotKey};
use podvisor_podvm::PodVmError;
use podvisor_podvm::container::ContainerSpecError;
use podvisor_proto::{ContainerSpec, GuestMessage, HostMessage};
use podvisor_vmm::process::VmmProcess;
use podvisor_vmm::{BlockDevice, PmemDevice};

use super::error::RuntimeError;
use super::hibernation::Hibernated;
use super::images::{HeldLayers, ImageProblem};
use super::plan::PodPlan;
use super::records::{PodRecord, VmRecord};

/// A running sandbox with a pod's containers, driven by the agent
/// protocol. Dropping it kills it (unless detached).
#[async_trait::async_trait]
pub trait Sandbox: Send {
    /// Sends a message to the agent.
    async fn send(&mut self, msg: &HostMessage) -> Result<(), PodVmError>;
    /// The next message from the agent; an error when the sandbox is gone.
    /// Cancel-safe.
    async fn next_event(&mut self) -> Result<GuestMessage, PodVmError>;
    /// The guest broke the protocol: kills the sandbox, returns the error
    /// to report.
    async fn reject(&mut self, what: String) -> PodVmError;
    /// Stops the containers (SIGTERM, SIGKILL after `grace`) and powers
    /// the sandbox off.
    async fn shutdown(self: Box<Self>, grace: Duration);
    /// Lets go of the sandbox, leaving it running for the next host
    /// daemon to adopt.
    fn detach(self: Box<Self>);
    /// Saves the sandbox's state into a new sealed snapshot in `dir`,
    /// bound to `context`, and leaves it paused. A snapshot that cannot be
    /// made leaves it running (or says it was lost).
    async fn save(self: Box<Self>, dir: &Path, context: &[u8])
    -> Result<Box<dyn Paused>, NotSaved>;
}

/// A sandbox whose state is in a snapshot, paused.
#[async_trait::async_trait]
pub trait Paused: Send {
    fn snapshot(&self) -> &Snapshot;
    fn key(&self) -> &SnapshotKey;
    /// Stops the sandbox: the pod now lives in the snapshot.
    async fn stop(self: Box<Self>);
    /// Deletes the snapshot and lets the sandbox run on; `why` is what
    /// stopped the hibernation.
    async fn resume(self: Box<Self>, why: HibernateError) -> NotSaved;
}

/// A hibernation that did not happen: why, and the sandbox if it still
/// runs.
pub struct NotSaved {
    pub sandbox: Option<Box<dyn Sandbox>>,
    pub error: HibernateError,
}

/// What a pod's containers need before its sandbox starts.
pub struct Prepared {
    /// The sandbox's disks (the layers of every container's image, on
    /// virtio-blk).
    pub disks: Vec<BlockDevice>,
    /// The layers of every container's image on virtio-pmem (mounted with
    /// DAX), when the pod's layers are not on `disks`.
    pub pmem: Vec<PmemDevice>,
    /// What each container of the plan runs, in the plan's order, or why
    /// that cannot be made from its image.
    pub containers: Vec<Result<ContainerSpec, ContainerSpecError>>,
    /// The layers now held for the pod (one entry per container, and one
    /// per JVM archive).
    pub holds: Vec<HeldLayers>,
    /// For each container of the plan, the key of the JVM archive it
    /// starts with, if it has one (see
    /// [`jvm_archive`](super::jvm_archive)).
    pub archive_keys: Vec<Option<String>>,
}

/// Makes and finds the sandboxes of this host's pods.
#[async_trait::async_trait]
pub trait Launcher: Send + Sync {
    /// At start-up, before any pod task runs: checks the host can run
    /// sandboxes under `run_dir`, and stops those no record in `records`
    /// knows (left by a daemon that died while starting one).
    fn recover(&self, run_dir: &Path, records: &[PodRecord]) -> Result<(), RuntimeError>;
    /// Gets the pod's images ready and held for it, and what each
    /// container runs.
    async fn prepare(&self, plan: &PodPlan) -> Result<Prepared, ImageProblem>;
    /// Lets go of layers held for a pod.
    async fn release(&self, holds: &[HeldLayers]);
    /// A JVM said it cannot use the archive of `key` it was started with:
    /// forget it, so the next start makes a new one.
    async fn archive_rejected(&self, _key: &str) {}
    /// Starts the pod's sandbox with `disks` and `pmem` devices; returns
    /// it and its process as the pod's record keeps it for adoption.
    async fn start(
        &self,
        plan: &PodPlan,
        disks: Vec<BlockDevice>,
        pmem: Vec<PmemDevice>,
    ) -> Result<(Box<dyn Sandbox>, VmmProcess), PodVmError>;
    /// Takes over the running sandbox `record` names (a previous daemon
    /// started it). Its first events are what the agent had queued, ending
    /// with the list of its processes.
    async fn adopt(&self, record: &VmRecord) -> Result<Box<dyn Sandbox>, PodVmError>;
    /// Kills what is left of the sandbox `record` names and removes its
    /// files (it could not be adopted, or it stopped).
    fn discard(&self, record: &VmRecord);
    /// The pod has finished for good, or is being deleted: frees what it
    /// keeps between its sandboxes (its network). Failures are logged; a
    /// later [`Launcher::reconcile`] retries.
    async fn finished(&self, _plan: &PodPlan) {}
    /// The pod's addresses, while it has a network.
    fn pod_ips(&self, _uid: &str) -> Vec<IpAddr> {
        vec![]
    }
    /// Frees what pods not in `live` (pod uids) still keep: left by a
    /// daemon that died, or a [`Launcher::finished`] that failed.
    async fn reconcile(&self, _live: &HashSet<String>) {}
    /// Why this host's sandboxes keep no logs and serve no exec, if so.
    fn without_logs_and_exec(&self) -> Option<&'static str> {
        None
    }
    /// Why this host's sandboxes cannot be hibernated, if so.
    fn without_hibernation(&self) -> Option<&'static str> {
        None
    }
    /// How many frames the pod's network has handed its sandbox so far
    /// (`None`: it has no network): a change is traffic for the pod.
    async fn frames_in(&self, _plan: &PodPlan) -> Option<u64> {
        None
    }
    /// The pod's sandbox was stopped for a hibernation, or a daemon
    /// restarted while it slept: from now on its network waits for the
    /// first request for it.
    async fn sleep(&self, _plan: &PodPlan) -> Result<(), PodVmError> {
        Ok(())
    }
    /// Returns when a request for the sleeping pod arrived (its first
    /// frame waits); never without a [`Launcher::sleep`]. Cancel-safe.
    async fn requested(&self, _plan: &PodPlan) -> Result<(), PodVmError> {
        std::future::pending().await
    }
    /// Brings the pod back from `hibernated` with `key`: a running
    /// sandbox with the state it was saved with (the requests that waited
    /// are let in once it runs), its identity set again within `timeout`.
    async fn wake(
        &self,
        plan: &PodPlan,
        hibernated: &Hibernated,
        key: &SnapshotKey,
        timeout: Duration,
    ) -> Result<(Box<dyn Sandbox>, VmmProcess), HibernateError>;
    /// The pod no longer sleeps without having woken (it is deleted, or
    /// its wake failed): forget what waited for its first request.
    fn forget_sleep(&self, _plan: &PodPlan) {}
}
