//! A pod VM with a ready agent: the unit that `podvisor run`, VM templates
//! and the host daemon build on.
//!
//! [`PodVm::boot`] launches a VM through the hypervisor trait and waits for
//! the agent's `Ready`; [`PodVm::load`] makes one from a saved state
//! instead (the saved VM, identity and all), [`PodVm::set_identity`] turns
//! a VM loaded from a template into a clone of its own, and
//! [`PodVm::save_state`] saves a running one. Afterwards
//! callers send [`HostMessage`]s and take
//! [`GuestMessage`]s from [`PodVm::next_event`], which also notices a VM
//! that died and a guest that broke the protocol (that VM is killed). The
//! pod's runtime directory is removed when the `PodVm` is dropped, after the
//! VM is gone.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use podvisor_guest::GuestArtifacts;
use podvisor_proto::{AgentInfo, GuestMessage, HostMessage};
use podvisor_vmm::device::FREE_PAGE_REPORTING_ID;
use podvisor_vmm::{Device, MemoryBacking, PciLayout, Vm, VmExit, VmSpec, VmmProcess};

use crate::agent_link::{self, AgentLinkError, AgentReceiver, AgentSender, sanitize_guest_text};

#[path = "pod_vm_clone.rs"]
mod clone;
use crate::{NodeConfig, PodVmError};
pub use clone::LoadSpec;

/// Kernel command line of every pod VM. The i8042 options skip probing for
/// a PS/2 controller the VM does not have. `swiotlb=noforce`: no 64 MiB
/// DMA bounce buffer, which the kernel sets up (and zeroes) whenever memory
/// may exist above 4 GiB, as in every VM with a virtio-pmem device (its
/// memory hot-plug area lies there): measured, a 256 MiB guest with DAX
/// layers had 66 MiB less memory and its QEMU 65 MiB more resident.
/// Nothing in a pod VM bounces: its devices are virtio without
/// `VIRTIO_F_ACCESS_PLATFORM`, which use guest-physical addresses directly.
pub const KERNEL_CMDLINE: &str = "console=ttyS0 quiet panic=-1 reboot=t \
    i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd cryptomgr.notests swiotlb=noforce";

/// Added for a VM of one vCPU: skips evaluating the ACPI interrupt-link
/// methods for each PCI device (about 1.1 s of the guest's module loading
/// under emulation; virtio uses MSI-X anyway, and ACPI PCI hotplug still
/// works). It also leaves the guest without its local APIC, so with it a
/// VM of more vCPUs brings up only one: those boot without it.
pub const ONE_CPU_CMDLINE: &str = "acpi=noirq";

/// What a pod VM is made of.
#[derive(Debug, Clone)]
pub struct PodVmSpec {
    /// Pod id: names the runtime directory and the QEMU process.
    pub id: String,
    pub cpus: u32,
    pub memory_mib: u64,
    /// Kernel and initramfs.
    pub guest: GuestArtifacts,
    /// The pod's own devices, besides the console, agent channel, RNG and
    /// generation ID every pod VM has: layer disks, network cards, ...
    pub devices: Vec<Device>,
    /// PCI addresses to keep (a VM loading a saved state: the saved VM's
    /// [`PodVm::pci_layout`]), or bridges to have for hot-plugging.
    pub pci: PciLayout,
    /// The network namespace the VMM runs in (its taps are there).
    pub netns: Option<PathBuf>,
    /// Where guest RAM lives (a file for templates and their clones).
    pub memory: MemoryBacking,
    /// Let KSM merge the guest's RAM with other VMs' ([`VmSpec::memory_merge`]):
    /// only for a host that runs KSM for its pods, never for an isolated pod.
    pub memory_merge: bool,
    /// Kill the VM when the process that started it dies (`podvisor run`).
    pub die_with_parent: bool,
}

/// A booted pod VM whose agent said `Ready`.
pub struct PodVm {
    pub id: String,
    /// What the agent reported when ready.
    pub agent: AgentInfo,
    /// When the VMM process was started.
    pub launched_at: Instant,
    /// When the agent said `Ready`.
    pub ready_at: Instant,
    vm: Box<dyn Vm>,
    tx: AgentSender,
    rx: AgentReceiver,
    /// Messages received before [`PodVm::next_event`] was first called
    /// (during an adoption, or while a clone took on its identity).
    pending: VecDeque<GuestMessage>,
    /// Adopted or restored from a template: the agent may say `Ready`
    /// again (it noticed the new host late), which is not an error then.
    adopted: bool,
    /// Set by [`PodVm::detach`]: leave the VM running when dropped.
    detached: bool,
    // Declared last: dropped after the VM handle.
    dir: PodDir,
}

impl PodVm {
    /// Starts a VM and waits until its agent is ready, or the boot timeout.
    pub async fn boot(cfg: &NodeConfig, spec: PodVmSpec) -> Result<PodVm, PodVmError> {
        let dir = PodDir::create(&cfg.run_dir.join("pods").join(&spec.id))?;
        let vm_spec = vm_spec(cfg, &spec, &dir.path, Start::Boot);
        let launched_at = Instant::now();
        let mut vm = cfg.hypervisor.launch(&vm_spec).await?;
        let (tx, mut rx) = match agent_link::connect(&vm.paths().agent_socket).await {
            Ok(link) => link,
            Err(e) => {
                let _ = vm.kill().await;
                return Err(PodVmError::Link(e));
            }
        };
        let ready = tokio::select! {
            msg = rx.recv() => match msg {
                Ok(GuestMessage::Ready(info)) => Ok(info),
                Ok(other) => Err(hostile(vm.as_mut(), format!("expected Ready, got {other:?}")).await),
                Err(e) => Err(link_failure(vm.as_mut(), e).await),
            },
            exit = vm.wait() => Err(died(vm.as_ref(), exit)),
            _ = tokio::time::sleep(cfg.boot_timeout) => Err(PodVmError::BootTimeout {
                timeout: cfg.boot_timeout,
                console_tail: podvisor_vmm::console::tail(&vm.paths().console_log, 3000),
            }),
        };
        let agent = match ready {
            Ok(info) => info,
            Err(e) => {
                let _ = vm.kill().await;
                return Err(e);
            }
        };
        tracing::debug!(pod = %spec.id, agent = %agent.agent_version, "agent ready");
        Ok(PodVm {
            id: spec.id,
            agent,
            launched_at,
            ready_at: Instant::now(),
            vm,
            tx,
            rx,
            pending: VecDeque::new(),
            adopted: false,
            detached: false,
            dir,
        })
    }

    /// The pod's runtime directory (sockets, console log).
    pub fn dir(&self) -> &Path {
        &self.dir.path
    }

    /// Process id of the VMM process.
    pub fn vmm_pid(&self) -> u32 {
        self.vm.pid()
    }

    /// The last bytes of the guest console.
    pub fn console_tail(&self, max_bytes: usize) -> String {
        podvisor_vmm::console::tail(&self.vm.paths().console_log, max_bytes)
    }

    /// Sends a message to the agent.
    pub async fn send(&mut self, msg: &HostMessage) -> Result<(), PodVmError> {
        match self.tx.send(msg).await {
            Ok(()) => Ok(()),
            Err(e) => Err(link_failure(self.vm.as_mut(), e).await),
        }
    }

    /// The next message from the agent. Cancel-safe, so it can sit in a
    /// `select!`. A VM that died, or a guest that sent something malformed
    /// (its VM is then killed), is an error.
    pub async fn next_event(&mut self) -> Result<GuestMessage, PodVmError> {
        if let Some(m) = self.pending.pop_front() {
            return Ok(m);
        }
        loop {
            return tokio::select! {
                msg = self.rx.recv() => match msg {
                    Ok(GuestMessage::Ready(_)) if self.adopted => continue,
                    Ok(GuestMessage::Ready(_)) => Err(hostile(self.vm.as_mut(), "a second Ready".into()).await),
                    Ok(m) => Ok(m),
                    Err(e) => Err(link_failure(self.vm.as_mut(), e).await),
                },
                exit = self.vm.wait() => Err(died(self.vm.as_ref(), exit)),
            };
        }
    }

    /// Puts a message back to be the next [`PodVm::next_event`] returns.
    pub(crate) fn requeue_front(&mut self, msg: GuestMessage) {
        self.pending.push_front(msg);
    }

    /// Reports a message that makes no sense in the caller's state as a
    /// protocol violation, killing the VM.
    pub async fn reject(&mut self, what: String) -> PodVmError {
        hostile(self.vm.as_mut(), what).await
    }

    /// Asks the agent to stop everything and power off; kills the VM if it
    /// has not exited within `grace` plus a few seconds. Removes the pod's
    /// files.
    pub async fn shutdown(mut self, grace: Duration) {
        let msg = HostMessage::Shutdown {
            grace_ms: grace.as_millis() as u64,
        };
        // A guest that does not even take the message is not waited for.
        if self
            .tx
            .send_within(&msg, SHUTDOWN_WRITE_TIMEOUT)
            .await
            .is_ok()
        {
            let vm = &mut self.vm;
            let rx = &mut self.rx;
            let wait = async {
                loop {
                    tokio::select! {
                        _ = vm.wait() => return,
                        // Keep draining so the agent never blocks on a write.
                        msg = rx.recv() => if msg.is_err() {
                            let _ = vm.wait().await;
                            return;
                        },
                    }
                }
            };
            if tokio::time::timeout(grace + Duration::from_secs(10), wait)
                .await
                .is_ok()
            {
                return;
            }
            tracing::warn!(pod = %self.id, "the VM did not power off in time; killing it");
        }
        let _ = self.vm.kill().await;
    }

    /// Kills the VM at once.
    pub async fn kill(mut self) {
        let _ = self.vm.kill().await;
    }

    /// What [`PodVm::adopt`] needs to find this VM again (for a host
    /// daemon's records; the VM must have been booted with
    /// `die_with_parent: false` to outlive its launcher).
    pub fn vmm_process(&self) -> Result<VmmProcess, PodVmError> {
        Ok(self.vm.vmm_process()?)
    }

    /// Lets go of the VM without stopping it: it keeps running, its runtime
    /// directory stays, and [`PodVm::adopt`] can take it over again.
    pub fn detach(mut self) {
        self.detached = true;
        self.dir.keep = true;
    }

    /// Takes over a running pod VM that another `PodVm` (usually in a host
    /// daemon that has since died) booted: adopts the VMM process and
    /// connects the agent channel. The previous host may have died in the
    /// middle of a frame, and the agent may not have noticed the new
    /// connection, so the channel is resynchronized and the agent asked
    /// for its processes ([`HostMessage::ListProcesses`], repeated if the
    /// request was lost); [`PodVm::next_event`] then yields what the agent
    /// had queued, ending with the [`GuestMessage::Processes`] answer.
    pub async fn adopt(
        cfg: &NodeConfig,
        id: &str,
        record: &VmmProcess,
    ) -> Result<PodVm, PodVmError> {
        let launched_at = Instant::now();
        let mut vm = cfg.hypervisor.adopt(record).await?;
        let (mut tx, mut rx) = agent_link::connect(&vm.paths().agent_socket)
            .await
            .map_err(PodVmError::Link)?;
        rx.resynchronize();
        let mut agent = None;
        let mut pending = VecDeque::new();
        let mut backlog = AdoptBacklog::default();
        let started = Instant::now();
        'ask: while started.elapsed() < ADOPT_READY_TIMEOUT {
            if let Err(e) = tx.send(&HostMessage::ListProcesses).await {
                return Err(link_failure(vm.as_mut(), e).await);
            }
            let deadline = tokio::time::Instant::now() + ADOPT_ASK_AGAIN;
            loop {
                let msg = tokio::select! {
                    msg = rx.recv() => msg,
                    exit = vm.wait() => return Err(died(vm.as_ref(), exit)),
                    _ = tokio::time::sleep_until(deadline) => continue 'ask,
                };
                match msg {
                    Ok(GuestMessage::Ready(info)) => agent = Some(info),
                    Ok(m @ GuestMessage::Processes { .. }) => {
                        pending.push_back(m);
                        break 'ask;
                    }
                    // Our request may have been mixed into a frame the
                    // previous host left unfinished: ask again.
                    Ok(GuestMessage::Error { .. }) => continue 'ask,
                    Ok(m) => match backlog.admit(&m) {
                        Ok(true) => pending.push_back(m),
                        Ok(false) => {}
                        Err(why) => return Err(hostile(vm.as_mut(), why).await),
                    },
                    Err(e) => return Err(link_failure(vm.as_mut(), e).await),
                }
            }
        }
        if backlog.dropped_output > 0 {
            tracing::warn!(
                pod = %id,
                "{} bytes of output the agent kept while no host was connected were dropped \
                 (more than {} MiB waited)",
                backlog.dropped_output,
                ADOPT_OUTPUT_BACKLOG >> 20
            );
        }
        if !matches!(pending.back(), Some(GuestMessage::Processes { .. })) {
            return Err(PodVmError::BootTimeout {
                timeout: ADOPT_READY_TIMEOUT,
                console_tail: podvisor_vmm::console::tail(&vm.paths().console_log, 3000),
            });
        }
        Ok(PodVm {
            id: id.to_string(),
            agent: agent.unwrap_or_else(|| AgentInfo {
                agent_version: "unknown (adopted)".into(),
                kernel_release: String::new(),
                boottime_ms: 0,
                boot_steps: vec![],
            }),
            launched_at,
            ready_at: Instant::now(),
            vm,
            tx,
            rx,
            pending,
            adopted: true,
            detached: false,
            dir: PodDir {
                path: record.run_dir.clone(),
                keep: false,
            },
        })
    }
}

/// How long an adopted VM's agent may take to answer on the new connection.
const ADOPT_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Most output an adoption keeps of what the agent queued while no host
/// was connected; more is dropped (and said so in the log).
const ADOPT_OUTPUT_BACKLOG: usize = 32 << 20;
/// Most bytes of other messages an adoption keeps before the answer it
/// waits for; an agent that sends more is hostile (real ones are a few
/// small messages per process).
const ADOPT_OTHER_BACKLOG: usize = 8 << 20;

/// What an adoption keeps of the messages that come before the agent's
/// `Processes` answer: bounded, so a guest cannot make the host hold any
/// amount of them in memory.
#[derive(Debug, Default)]
struct AdoptBacklog {
    output: usize,
    other: usize,
    dropped_output: usize,
}

impl AdoptBacklog {
    /// Whether to keep `msg` (`false`: output beyond the bound, dropped);
    /// an error for a guest that sent too much else.
    fn admit(&mut self, msg: &GuestMessage) -> Result<bool, String> {
        if let GuestMessage::Output { id, data, .. } = msg {
            let len = id.len() + data.len();
            if self.output + len > ADOPT_OUTPUT_BACKLOG {
                self.dropped_output += data.len();
                return Ok(false);
            }
            self.output += len;
            return Ok(true);
        }
        let len = podvisor_proto::encode(msg)
            .map(|f| f.len())
            .unwrap_or(usize::MAX);
        if self.other.saturating_add(len) > ADOPT_OTHER_BACKLOG {
            return Err(format!(
                "more than {} MiB of messages other than output before answering ListProcesses",
                ADOPT_OTHER_BACKLOG >> 20
            ));
        }
        self.other += len;
        Ok(true)
    }
}
/// When to repeat an unanswered `ListProcesses` during an adoption.
const ADOPT_ASK_AGAIN: Duration = Duration::from_secs(2);

impl Drop for PodVm {
    fn drop(&mut self) {
        // Never leave a VM behind a dropped handle, unless detached.
        if !self.detached && !matches!(self.vm.try_wait(), Ok(Some(_))) {
            self.vm.start_kill();
        }
    }
}

/// How a VM starts: booted, or loaded from a saved state (whose devices
/// it must have, no more and no less).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    Boot,
    Load,
}

/// The backend-neutral description of a pod VM in `dir`.
fn vm_spec(cfg: &NodeConfig, spec: &PodVmSpec, dir: &Path, start: Start) -> VmSpec {
    // A booted VM with anonymous RAM reports free pages if the host does;
    // a loaded one has the device exactly if the saved VM had it.
    let reports_free_pages = match start {
        Start::Boot => cfg.free_page_reporting && matches!(spec.memory, MemoryBacking::Anonymous),
        Start::Load => spec.pci.slots.contains_key(FREE_PAGE_REPORTING_ID),
    };
    VmSpec {
        name: format!("podvisor-{}", spec.id),
        cpus: spec.cpus,
        memory_mib: spec.memory_mib,
        memory: spec.memory.clone(),
        memory_merge: spec.memory_merge,
        kernel: spec.guest.kernel.clone(),
        initramfs: spec.guest.initramfs.clone(),
        kernel_cmdline: kernel_cmdline(spec.cpus, &cfg.extra_kernel_args),
        devices: Device::pod_basics(podvisor_proto::AGENT_PORT_NAME)
            .into_iter()
            .chain(spec.devices.iter().cloned())
            // It takes the highest free root slot (vmm's PciSlots::place).
            .chain(reports_free_pages.then_some(Device::FreePageReporting))
            .collect(),
        pci: spec.pci.clone(),
        run_dir: dir.to_path_buf(),
        accel: cfg.accel,
        die_with_parent: spec.die_with_parent,
        netns: spec.netns.clone(),
    }
}

/// podvisor's kernel command line for a VM of `cpus` vCPUs, with the
/// user's extra arguments.
pub fn kernel_cmdline(cpus: u32, extra: &[String]) -> String {
    let mut line = KERNEL_CMDLINE.to_string();
    if cpus <= 1 {
        line.push(' ');
        line.push_str(ONE_CPU_CMDLINE);
    }
    for arg in extra {
        line.push(' ');
        line.push_str(arg);
    }
    line
}

fn died(vm: &dyn Vm, exit: Result<VmExit, podvisor_vmm::VmmError>) -> PodVmError {
    match exit {
        Ok(exit) => PodVmError::VmDied {
            exit,
            console_tail: podvisor_vmm::console::tail(&vm.paths().console_log, 3000),
        },
        Err(e) => e.into(),
    }
}

async fn hostile(vm: &mut dyn Vm, what: String) -> PodVmError {
    let _ = vm.kill().await;
    PodVmError::HostileGuest(AgentLinkError::Unexpected(sanitize_guest_text(&what)))
}

/// The channel failed: a protocol error is the guest's fault (kill it); a
/// closed channel usually means the VM died, which is reported as such.
async fn link_failure(vm: &mut dyn Vm, e: AgentLinkError) -> PodVmError {
    match e {
        AgentLinkError::Protocol(_) => {
            let _ = vm.kill().await;
            PodVmError::HostileGuest(e)
        }
        other => match tokio::time::timeout(Duration::from_secs(5), vm.wait()).await {
            Ok(exit) => died(vm, exit),
            Err(_) => {
                let _ = vm.kill().await;
                PodVmError::Link(other)
            }
        },
    }
}

/// How long [`PodVm::shutdown`] waits for the guest to take its
/// `Shutdown` before it kills the VM.
const SHUTDOWN_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// A pod's runtime directory, removed with everything in it when dropped
/// (unless kept for a detached VM).
struct PodDir {
    path: PathBuf,
    keep: bool,
}

impl PodDir {
    /// Makes the directory (and missing parents) mode 0700: it holds the
    /// guest's console log and the VM's control sockets, the daemon's only.
    fn create(path: &Path) -> Result<Self, PodVmError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|source| PodVmError::Io {
                what: format!("create pod directory {}", path.display()),
                source,
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            keep: false,
        })
    }
}

impl Drop for PodDir {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A new random pod id: 12 hex digits, like a short container id.
pub fn new_pod_id() -> Result<String, podvisor_store::RandomError> {
    podvisor_store::random_hex(6)
}

#[cfg(test)]
mod adopt_backlog_tests {
    use super::*;
    use podvisor_proto::Stream;

    #[test]
    fn output_beyond_the_bound_is_dropped_and_floods_of_the_rest_are_hostile() {
        let mut backlog = AdoptBacklog::default();
        let chunk = GuestMessage::Output {
            id: "c".into(),
            stream: Stream::Stdout,
            data: vec![0; 1 << 20],
        };
        let kept = (0..100).filter(|_| backlog.admit(&chunk).unwrap()).count();
        assert_eq!(kept, 31, "1 MiB and one byte of id each, 32 MiB kept");
        assert_eq!(backlog.dropped_output, 69 << 20);
        // The few messages a real agent queues pass.
        let exited = GuestMessage::Exited {
            id: "c".into(),
            status: podvisor_proto::ExitStatus::Code(0),
        };
        assert!(backlog.admit(&exited).unwrap());
        // A flood of anything else is refused.
        let flood = GuestMessage::Started {
            id: "x".repeat(512 * 1024),
            pid: 1,
        };
        let err = (0..100).find_map(|_| backlog.admit(&flood).err()).unwrap();
        assert!(err.contains("more than 8 MiB"), "{err}");
    }
}
