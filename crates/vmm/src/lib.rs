//! The hypervisor abstraction of podvisor and its QEMU backend.
//!
//! Callers describe a pod VM with a backend-neutral [`VmSpec`]: CPUs,
//! memory, boot files and a list of typed [`Device`]s (disks, network
//! cards, pmem, the agent channel, console, RNG, ...), which the backend
//! places on PCI slots. The backend ([`Hypervisor`]) is chosen at run time
//! and built once ([`hypervisor`]); callers hold the `Arc`. Nothing
//! QEMU-specific leaks out: the QEMU command line is built from typed
//! argument groups in [`qemu::cmdline`] and the QMP client lives in
//! [`qemu::qmp`]. This crate also decides the accelerator ([`accel`]).
//!
//! A running VM takes devices ([`Vm::add_device`], [`Vm::remove_device`]).
//! Its state can be saved as one byte stream ([`Vm::save_state`], leaving
//! it paused or running) and loaded into a new VM
//! ([`Hypervisor::load_state`]) with the same devices at the same PCI
//! addresses ([`Vm::pci_layout`]); giving a loaded VM a new identity (a
//! clone) is the caller's separate step. VM templates use these with RAM in
//! a file ([`MemoryBacking::File`]): the state stream then holds the
//! devices only, and every clone maps the template's RAM file
//! copy-on-write. The stream goes through the caller (a `Write`/`Read`), so
//! it can be hashed, compressed or encrypted on the way.

pub mod accel;
pub mod cgroup;
pub mod console;
pub mod device;
pub mod process;
pub mod qemu;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use accel::{Accel, AccelChoice};
pub use device::{
    BlockDevice, Device, DeviceKind, MacAddress, NetworkDevice, PciAddress, PciLayout, PmemDevice,
    Tap,
};
pub use process::VmmProcess;

/// Everything needed to start one pod VM, independent of the backend.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Short name, used for the process title and logs.
    pub name: String,
    /// Number of virtual CPUs.
    pub cpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Where guest RAM lives.
    pub memory: MemoryBacking,
    /// Let KSM merge guest RAM with other VMs' (QEMU's `mem-merge`). Off
    /// unless the host runs KSM for its pods and the pod did not ask for
    /// isolation: merged pages are a side channel between VMs.
    pub memory_merge: bool,
    /// Kernel image (`vmlinuz`).
    pub kernel: PathBuf,
    /// Initramfs holding the agent.
    pub initramfs: PathBuf,
    /// Kernel command line.
    pub kernel_cmdline: String,
    /// The VM's devices. PCI devices get slots in this order unless
    /// [`VmSpec::pci`] pins them.
    pub devices: Vec<Device>,
    /// PCI addresses to keep: for a VM loading a saved state, the saved
    /// VM's [`Vm::pci_layout`]; for a fresh boot, empty, or only a number
    /// of bridges so that many devices can be hot-plugged later.
    pub pci: PciLayout,
    /// Directory for this VM's sockets, console log and state; must exist.
    pub run_dir: PathBuf,
    /// Accelerator to use.
    pub accel: Accel,
    /// Kill the VM if the launching process dies (for `podvisor run`); a host
    /// daemon leaves it off so its VMs survive a daemon restart.
    pub die_with_parent: bool,
    /// A network namespace (a file such as `/run/netns/NAME`) the VMM runs
    /// in, entered before it starts; the VM's taps live there. `None`: the
    /// launcher's.
    pub netns: Option<PathBuf>,
}

/// What a VM does once its state is saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterSave {
    /// Stays paused (to be killed: a template, a hibernated pod). A VM
    /// whose RAM is a shared file must stay paused: its writes would go to
    /// the file the state refers to.
    Paused,
    /// Runs on (a checkpoint).
    Running,
}

/// Where a VM's RAM lives.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum MemoryBacking {
    /// Private memory of the VMM process (a cold-booted pod).
    #[default]
    Anonymous,
    /// A file of exactly the guest's RAM size, normally on tmpfs. RAM in a
    /// file is not part of a saved state: restoring needs the same file.
    File {
        path: PathBuf,
        /// `true`: the guest's writes go to the file (a template being
        /// made). `false`: the file is mapped copy-on-write, so the guest's
        /// writes stay private to this VM and the file never changes (a
        /// clone).
        shared: bool,
    },
}

/// Files a running VM is reached through; all live in [`VmSpec::run_dir`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    /// Unix socket of the agent's virtio-serial port (QEMU listens).
    pub agent_socket: PathBuf,
    /// Unix socket of the VMM control channel (QMP for QEMU).
    pub control_socket: PathBuf,
    /// The guest's serial console, captured to a file.
    pub console_log: PathBuf,
}

impl VmPaths {
    /// The fixed layout of files inside a VM's run directory.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            agent_socket: dir.join("agent.sock"),
            control_socket: dir.join("control.sock"),
            console_log: dir.join("console.log"),
        }
    }
}

/// How the VMM process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// It exited by itself (guest power-off or QEMU error) with this code.
    Exited(i32),
    /// It was killed by this signal.
    Killed(i32),
    /// It is gone, but was not our child (an adopted VM), so how it ended
    /// is not known.
    Unknown,
}

/// Errors of launching and controlling VMs.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot start {binary} (is the qemu-system-x86 package installed?)")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),
    #[error("the VM exited during start-up ({exit:?}); console tail:\n{console_tail}")]
    EarlyExit { exit: VmExit, console_tail: String },
    #[error("control channel")]
    Control(#[from] qemu::qmp::QmpError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error("cannot adopt the VM of process {pid}: {reason}")]
    NotAdoptable { pid: u32, reason: String },
    #[error("saving the VM state failed: {0}")]
    Save(String),
    #[error("restoring the VM state failed: {0}")]
    Restore(String),
    #[error("hot-plugging {kind} device {id}: {reason}")]
    Hotplug {
        kind: DeviceKind,
        id: String,
        reason: String,
    },
    #[error("removing device {id}: {reason}")]
    Unplug { id: String, reason: String },
    #[error("{0}")]
    NoPciSlot(String),
    #[error("the VM has exited")]
    Gone,
    #[error("cannot confine the VMM")]
    Confine(#[source] Box<cgroup::CgroupError>),
}

/// A hypervisor backend: turns a [`VmSpec`] into a running VM.
#[async_trait]
pub trait Hypervisor: Send + Sync + std::fmt::Debug {
    /// Backend name, e.g. `qemu`.
    fn name(&self) -> &'static str;

    /// Starts a VM. Returns once the VMM process runs and its control channel
    /// answers; the guest may still be booting.
    async fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, VmmError>;

    /// Re-attaches to a VM launched earlier, possibly by another process
    /// that has since died (a host daemon restarting), from the record
    /// [`Vm::vmm_process`] gave: checks that the recorded process is still
    /// that VM's VMM (never a process that reused its pid) and reconnects
    /// its control channel. The agent channel is the caller's to reconnect.
    async fn adopt(&self, record: &VmmProcess) -> Result<Box<dyn Vm>, VmmError>;

    /// Starts a VM from a state saved by [`Vm::save_state`], read from
    /// `state` to its end. `spec` must describe the saved VM: its devices
    /// (those hot-plugged before the save included) with the saved VM's
    /// [`Vm::pci_layout`] as [`VmSpec::pci`], the same CPUs and memory size;
    /// RAM in a file must hold what it held when the state was saved. Paths
    /// of sockets and logs may differ, and so may the backends of devices
    /// (another tap, another copy of a disk). The VM is returned paused:
    /// call [`Vm::resume`]. It is the saved VM, identity and all; making it
    /// a clone is the caller's next step. A state the VMM rejects is a
    /// [`VmmError::Restore`] naming why.
    async fn load_state(
        &self,
        spec: &VmSpec,
        state: Box<dyn Read + Send>,
    ) -> Result<Box<dyn Vm>, VmmError>;

    /// The VMM's version and podvisor's device layout for it, e.g.
    /// `QEMU emulator version 7.2.22 (…); podvisor device layout 1`: a
    /// saved state is only restored by the build and layout that saved it.
    /// Runs the VMM binary; callers cache it under
    /// [`Hypervisor::version_fingerprint`].
    fn version(&self) -> Result<String, VmmError>;

    /// A cheap identity of the VMM binary (resolved path, size, modification
    /// time, inode) that changes whenever [`Hypervisor::version`] may.
    fn version_fingerprint(&self) -> Result<String, VmmError>;
}

/// A running VM.
#[async_trait]
pub trait Vm: Send {
    /// Process id of the VMM process.
    fn pid(&self) -> u32;

    /// The sockets and log of this VM.
    fn paths(&self) -> &VmPaths;

    /// The last `max_bytes` of the guest console, for error messages.
    fn console_tail(&self, max_bytes: usize) -> String {
        console::tail(&self.paths().console_log, max_bytes)
    }

    /// Waits until the VMM process has exited.
    async fn wait(&mut self) -> Result<VmExit, VmmError>;

    /// Returns the exit status if the VMM process has already exited.
    fn try_wait(&mut self) -> Result<Option<VmExit>, VmmError>;

    /// Kills the VMM process at once and reaps it.
    async fn kill(&mut self) -> Result<VmExit, VmmError>;

    /// Sends the VMM process SIGKILL without waiting (for `Drop` paths).
    fn start_kill(&mut self);

    /// What [`Hypervisor::adopt`] needs to find this VM again.
    fn vmm_process(&self) -> Result<VmmProcess, VmmError> {
        let run_dir = self
            .paths()
            .control_socket
            .parent()
            .unwrap_or(std::path::Path::new("/"));
        VmmProcess::of(self.pid(), run_dir)
    }

    /// Stops the guest's CPUs.
    async fn pause(&mut self) -> Result<(), VmmError>;

    /// Lets a paused (or just restored) guest run.
    async fn resume(&mut self) -> Result<(), VmmError>;

    /// Pauses the VM (if it runs) and writes its state to `sink` as one
    /// byte stream: device state, and RAM unless RAM is in a file. Then the
    /// VM stays paused or runs on, as `after` says. Returns the bytes
    /// written. Load it with [`Hypervisor::load_state`], giving the VM's
    /// devices and [`Vm::pci_layout`] as they were at the save.
    async fn save_state(
        &mut self,
        sink: Box<dyn Write + Send>,
        after: AfterSave,
    ) -> Result<u64, VmmError>;

    /// Attaches a device to the running VM (disks, network cards, pmem)
    /// in the lowest free PCI slot, and returns that slot.
    async fn add_device(&mut self, device: Device) -> Result<PciAddress, VmmError>;

    /// Detaches device `id` (added at start or later): asks the guest to
    /// release it, waits until it has, then frees its backend and slot.
    async fn remove_device(&mut self, id: &str) -> Result<(), VmmError>;

    /// Where the VM's PCI devices are now, hot-plugged ones included.
    fn pci_layout(&self) -> PciLayout;
}

/// Builds the backend named `name` (`qemu` is the only one so far), once:
/// callers hold it.
pub fn hypervisor(name: &str) -> Result<Arc<dyn Hypervisor>, VmmError> {
    match name {
        "qemu" => Ok(Arc::new(qemu::Qemu::from_env())),
        other => Err(VmmError::InvalidSpec(format!(
            "unknown hypervisor backend {other:?} (known: qemu)"
        ))),
    }
}
