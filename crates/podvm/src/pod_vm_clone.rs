//! Pod VMs and saved states: [`PodVm::save_state`], [`PodVm::load`] (the
//! saved VM again, identity and all) and [`PodVm::set_identity`] (what
//! turns a VM loaded from a template into a clone of its own), as separate
//! steps; and the devices of a running pod VM ([`PodVm::add_device`],
//! [`PodVm::remove_device`]).

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use podvisor_proto::{AgentInfo, CloneIdentity, GuestMessage, HostMessage};
use podvisor_vmm::{AfterSave, Device, PciAddress, PciLayout};

use super::{PodDir, PodVm, PodVmSpec, Start, died, hostile, link_failure, vm_spec};
use crate::agent_link::{self, sanitize_guest_text};
use crate::{NodeConfig, PodVmError};

/// What a VM is loaded from, besides its [`PodVmSpec`] (which must have
/// the saved VM's devices, PCI layout and RAM file).
pub struct LoadSpec {
    /// The saved state, already checked by the caller.
    pub state: Box<dyn Read + Send>,
    /// What the saved VM's agent said when it was ready; a loaded agent
    /// need not say it again.
    pub agent: AgentInfo,
}

/// How long a VM about to be saved runs after its host left.
const SAVE_SETTLE: Duration = Duration::from_millis(100);

/// Random bytes each clone's kernel RNG gets.
const IDENTITY_ENTROPY: usize = 64;

/// Most messages a clone may send before it confirms its identity (output
/// of a warm container); more is a misbehaving guest.
const MAX_EARLY_MESSAGES: usize = 1024;

impl PodVm {
    /// Makes a pod VM from a saved state: loads it paused, connects the
    /// agent channel and resumes it. The VM is the one that was saved,
    /// with its hostname, RNG state and (stale) clock; a template's clone
    /// gets its own with [`PodVm::set_identity`] next.
    pub async fn load(
        cfg: &NodeConfig,
        spec: PodVmSpec,
        load: LoadSpec,
    ) -> Result<PodVm, PodVmError> {
        let dir = PodDir::create(&cfg.run_dir.join("pods").join(&spec.id))?;
        let vm_spec = vm_spec(cfg, &spec, &dir.path, Start::Load);
        let launched_at = Instant::now();
        let mut vm = cfg.hypervisor.load_state(&vm_spec, load.state).await?;
        tracing::debug!(pod = %spec.id, elapsed = ?launched_at.elapsed(), "state loaded");
        let (tx, rx) = match agent_link::connect(&vm.paths().agent_socket).await {
            Ok(link) => link,
            Err(e) => {
                let _ = vm.kill().await;
                return Err(PodVmError::Link(e));
            }
        };
        if let Err(e) = vm.resume().await {
            let _ = vm.kill().await;
            return Err(e.into());
        }
        Ok(PodVm {
            id: spec.id,
            agent: load.agent,
            launched_at,
            ready_at: Instant::now(),
            vm,
            tx,
            rx,
            pending: VecDeque::new(),
            // The agent says Ready when it notices the new host.
            adopted: true,
            detached: false,
            dir,
        })
    }

    /// Gives a VM loaded from a template state its own identity: fresh
    /// entropy for its RNG, the host's clock, `hostname`. Returns once the
    /// agent has confirmed it (what it sent before is kept for
    /// [`PodVm::next_event`]); a VM that cannot take it on within `timeout`
    /// is killed.
    pub async fn set_identity(
        &mut self,
        hostname: &str,
        timeout: Duration,
    ) -> Result<(), PodVmError> {
        self.send_identity(hostname).await?;
        self.identity_confirmed(timeout).await
    }

    /// The first half of [`PodVm::set_identity`]: sends the identity (the
    /// agent takes it on as soon as it reads it), without waiting.
    pub async fn send_identity(&mut self, hostname: &str) -> Result<(), PodVmError> {
        let identity = CloneIdentity {
            hostname: hostname.to_string(),
            unix_time_ns: unix_time_ns(),
            entropy: podvisor_store::random_bytes(IDENTITY_ENTROPY)?,
        };
        if let Err(e) = self.tx.send(&HostMessage::Identity(identity)).await {
            return Err(link_failure(self.vm.as_mut(), e).await);
        }
        Ok(())
    }

    /// The second half of [`PodVm::set_identity`]: waits for the agent to
    /// confirm the identity [`PodVm::send_identity`] sent.
    pub async fn identity_confirmed(&mut self, timeout: Duration) -> Result<(), PodVmError> {
        let vm = &mut self.vm;
        let rx = &mut self.rx;
        let agent = &mut self.agent;
        let early = &mut self.pending;
        // The agent answers the identity whether or not it noticed that its
        // host changed; it may say Ready first if it did.
        let confirmed = async {
            loop {
                tokio::select! {
                    msg = rx.recv() => match msg {
                        Ok(GuestMessage::Ready(info)) => *agent = info,
                        Ok(GuestMessage::IdentitySet { errors }) if errors.is_empty() => return Ok(()),
                        Ok(GuestMessage::IdentitySet { errors }) => {
                            let errors = errors.iter().map(|e| sanitize_guest_text(e)).collect();
                            let _ = vm.kill().await;
                            return Err(PodVmError::Identity(errors));
                        }
                        Ok(GuestMessage::Error { message }) => {
                            tracing::warn!("agent: {}", sanitize_guest_text(&message));
                        }
                        Ok(other) if early.len() < MAX_EARLY_MESSAGES => early.push_back(other),
                        Ok(_) => return Err(hostile(vm.as_mut(), "too many messages before the identity was set".into()).await),
                        Err(e) => return Err(link_failure(vm.as_mut(), e).await),
                    },
                    exit = vm.wait() => return Err(died(vm.as_ref(), exit)),
                }
            }
        };
        match tokio::time::timeout(timeout, confirmed).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                let console_tail = podvisor_vmm::console::tail(&self.vm.paths().console_log, 3000);
                let _ = self.vm.kill().await;
                return Err(PodVmError::BootTimeout {
                    timeout,
                    console_tail,
                });
            }
        }
        self.ready_at = Instant::now();
        tracing::debug!(pod = %self.id, elapsed = ?self.launched_at.elapsed(), "clone has its own identity");
        Ok(())
    }

    /// Attaches a device (a disk, a network card, pmem) to the running VM;
    /// returns the PCI slot it got.
    pub async fn add_device(&mut self, device: Device) -> Result<PciAddress, PodVmError> {
        Ok(self.vm.add_device(device).await?)
    }

    /// Detaches device `id` from the running VM, once the guest let go.
    pub async fn remove_device(&mut self, id: &str) -> Result<(), PodVmError> {
        Ok(self.vm.remove_device(id).await?)
    }

    /// Where the VM's PCI devices are: what a VM loading a state saved now
    /// must be given ([`PodVmSpec::pci`]).
    pub fn pci_layout(&self) -> PciLayout {
        self.vm.pci_layout()
    }

    /// Saves the VM's state into `sink`: closes the agent channel (whoever
    /// loads the state connects afresh), pauses the VM and streams its
    /// state. Then the VM stays paused (a template: kill it; its RAM file
    /// must not change) or runs on with a new agent channel, as `after`
    /// says. Returns the bytes written.
    pub async fn save_state(
        &mut self,
        sink: Box<dyn Write + Send>,
        after: AfterSave,
    ) -> Result<u64, PodVmError> {
        self.tx.close().await;
        // QEMU closes its end once it has seen ours go.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while self.rx.recv().await.is_ok() {}
        })
        .await;
        // Let the agent see the host leave, so that it drops a frame it
        // was half-way through writing rather than finish it to the next
        // host (which copes either way).
        tokio::time::sleep(SAVE_SETTLE).await;
        let written = self.vm.save_state(sink, after).await?;
        if after == AfterSave::Running {
            self.reconnect().await?;
        }
        Ok(written)
    }

    /// Lets a VM whose saving failed (its sink could not take the state:
    /// a full disk, say) run on: resumes it and connects a new agent
    /// channel. A VM that cannot is killed and the error says why.
    pub async fn resume_after_failed_save(&mut self) -> Result<(), PodVmError> {
        if let Err(e) = self.vm.resume().await {
            let _ = self.vm.kill().await;
            return Err(e.into());
        }
        self.reconnect().await
    }

    /// A new agent channel after the old one was closed for a save.
    async fn reconnect(&mut self) -> Result<(), PodVmError> {
        let (tx, rx) = match agent_link::connect(&self.vm.paths().agent_socket).await {
            Ok(link) => link,
            Err(e) => return Err(link_failure(self.vm.as_mut(), e).await),
        };
        self.tx = tx;
        self.rx = rx;
        // The agent says Ready again to the new connection.
        self.adopted = true;
        Ok(())
    }
}

/// Nanoseconds since the epoch on the host's clock.
fn unix_time_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
