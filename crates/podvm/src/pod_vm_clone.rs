//! Pod VMs made from and into VM template states: [`PodVm::restore`] (a
//! clone, given its own identity) and [`PodVm::save_state`].

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use podvisor_proto::{AgentInfo, CloneIdentity, GuestMessage, HostMessage};
use podvisor_vmm::DiskSpec;

use super::{PodDir, PodVm, PodVmSpec, died, hostile, link_failure, vm_spec};
use crate::agent_link::{self, sanitize_guest_text};
use crate::{NodeConfig, PodVmError};

/// What a clone is restored from, besides its [`PodVmSpec`] (which must
/// have the template's disks and RAM file).
pub struct RestoreSpec {
    /// The template's saved state, already checked by the caller.
    pub state: Box<dyn Read + Send>,
    /// What the template's agent said when it was ready; a clone's agent
    /// need not say it again.
    pub agent: AgentInfo,
    /// The clone's own hostname.
    pub hostname: String,
}

/// How long a VM about to be saved runs after its host left.
const SAVE_SETTLE: Duration = Duration::from_millis(100);

/// Random bytes each clone's kernel RNG gets.
const IDENTITY_ENTROPY: usize = 64;

/// Most messages a clone may send before it confirms its identity (output
/// of a warm container); more is a misbehaving guest.
const MAX_EARLY_MESSAGES: usize = 1024;

impl PodVm {
    /// Makes a pod VM from a saved template state: restores it paused,
    /// resumes it, and gives it its own identity (fresh entropy for its
    /// RNG, the host's clock, its hostname). Returns once the agent has
    /// confirmed the identity; a clone that cannot take it on is killed.
    pub async fn restore(
        cfg: &NodeConfig,
        spec: PodVmSpec,
        restore: RestoreSpec,
    ) -> Result<PodVm, PodVmError> {
        let dir = PodDir::create(&cfg.run_dir.join("pods").join(&spec.id))?;
        let vm_spec = vm_spec(cfg, &spec, &dir.path);
        let hypervisor = podvisor_vmm::hypervisor(&cfg.hypervisor)?;
        let launched_at = Instant::now();
        let mut vm = hypervisor.restore(&vm_spec, restore.state).await?;
        tracing::debug!(pod = %spec.id, elapsed = ?launched_at.elapsed(), "state loaded");
        let (mut tx, mut rx) = match agent_link::connect(&vm.paths().agent_socket).await {
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
        let identity = match podvisor_store::random_bytes(IDENTITY_ENTROPY) {
            Ok(entropy) => CloneIdentity {
                hostname: restore.hostname,
                unix_time_ns: unix_time_ns(),
                entropy,
            },
            Err(e) => {
                let _ = vm.kill().await;
                return Err(e.into());
            }
        };
        if let Err(e) = tx.send(&HostMessage::Identity(identity)).await {
            return Err(link_failure(vm.as_mut(), e).await);
        }
        let mut agent = restore.agent;
        let mut early = VecDeque::new();
        // The agent answers the identity whether or not it noticed that its
        // host changed; it may say Ready first if it did.
        let confirmed = async {
            loop {
                tokio::select! {
                    msg = rx.recv() => match msg {
                        Ok(GuestMessage::Ready(info)) => agent = info,
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
        match tokio::time::timeout(cfg.boot_timeout, confirmed).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                let console_tail = vm.console_tail(3000);
                let _ = vm.kill().await;
                return Err(PodVmError::BootTimeout {
                    timeout: cfg.boot_timeout,
                    console_tail,
                });
            }
        }
        tracing::debug!(pod = %spec.id, elapsed = ?launched_at.elapsed(), "clone has its own identity");
        Ok(PodVm {
            id: spec.id,
            agent,
            launched_at,
            ready_at: Instant::now(),
            vm,
            tx,
            rx,
            pending: early,
            adopted: true,
            detached: false,
            dir,
        })
    }

    /// Attaches a disk to the running VM as disk `index` (its position had
    /// it been in [`PodVmSpec::disks`]).
    pub async fn hotplug_disk(&mut self, index: usize, disk: &DiskSpec) -> Result<(), PodVmError> {
        Ok(self.vm.hotplug_disk(index, disk).await?)
    }

    /// Turns this VM into a saved state for a template: closes the agent
    /// channel (clones connect afresh), pauses the VM, streams its state
    /// into `sink` and kills it. Returns the bytes written.
    pub async fn save_state(mut self, sink: Box<dyn Write + Send>) -> Result<u64, PodVmError> {
        self.tx.close().await;
        // QEMU closes its end once it has seen ours go.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while self.rx.recv().await.is_ok() {}
        })
        .await;
        // Let the agent see the host leave, so that it drops a frame it
        // was half-way through writing rather than finish it to a clone's
        // host (clones cope either way, answering their identity).
        tokio::time::sleep(SAVE_SETTLE).await;
        let result = self.vm.save_state(sink).await;
        let _ = self.vm.kill().await;
        Ok(result?)
    }
}

/// Nanoseconds since the epoch on the host's clock.
fn unix_time_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
