//! Pod VMs as the host runtime's sandboxes: images through the global
//! cache, one VM per pod booted in its own session (it outlives the
//! daemon), adopted again by the next daemon; with pod networking on, each
//! pod's CNI attachment ([`podvisor_net`]) made at its first VM start and
//! kept until the pod is finished, and each VM's NIC on a fresh tap in it.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use podvisor_hibernate::{HibernateError, Snapshot, SnapshotKey};
use podvisor_net::PodNetworks;
use podvisor_net::cni::PodIdentity;
use podvisor_net::pod_network::AttachRequest;
use podvisor_net::vm_nic;
use podvisor_podvm::container::process_spec;
use podvisor_podvm::network::{self, PodNic};
use podvisor_podvm::{NodeConfig, PodVm, PodVmError, PodVmSpec};
use podvisor_proto::{ContainerSpec, GuestMessage, HostMessage};
use podvisor_vmm::process::VmmProcess;
use podvisor_vmm::{BlockDevice, Device, PmemDevice};

use super::HostConfig;
use super::error::RuntimeError;
use super::hibernation::{self, Hibernated};
use super::images::{self, HeldLayers, ImageProblem};
use super::jvm_archive;
use super::plan::PodPlan;
use super::records::{PodRecord, StateDir, VmRecord};
use super::runtime_sizing::runtime_sizing;
use super::sandbox::{Launcher, NotSaved, Paused, Prepared, Sandbox};

/// Launches each pod in its own VM.
pub struct VmLauncher {
    node: NodeConfig,
    /// The pods' networks; `None`: pods have only `lo`.
    networks: Option<PodNetworks>,
    /// The NICs of hibernated pods, waiting for their first request (by
    /// pod uid).
    sleeping: Mutex<HashMap<String, Arc<PodNic>>>,
    /// The guest the last VM booted with: a wake loads the snapshot's
    /// memory over it, so any will do, and looking it up again (hashing
    /// the kernel and agent) would delay the wake.
    last_guest: Mutex<Option<podvisor_guest::GuestArtifacts>>,
    /// JVM archive training runs going on (see [`jvm_archive`]).
    trainings: jvm_archive::Trainings,
    /// Their warm-up; `None`: no archives on this host.
    jvm_warm_up: Option<Duration>,
    /// [`HostConfig::memory_merge`].
    memory_merge: bool,
}

impl VmLauncher {
    /// VMs with `cfg`'s node settings, their run directories under its
    /// state directory; opens pod networking if `cfg` has it (which locks
    /// its state directory for this process).
    pub fn new(cfg: &HostConfig) -> Result<VmLauncher, RuntimeError> {
        let mut node = cfg.node.clone();
        node.run_dir = StateDir::run_dir_under(&cfg.state_dir);
        let networks = match &cfg.network {
            Some(net) => Some(PodNetworks::open(net.clone())?),
            None => None,
        };
        Ok(VmLauncher {
            node,
            networks,
            sleeping: Mutex::new(HashMap::new()),
            last_guest: Mutex::new(None),
            trainings: Default::default(),
            jvm_warm_up: cfg.jvm_archive_warm_up,
            memory_merge: cfg.memory_merge,
        })
    }

    /// The node settings a VM of `plan` boots with. A pod that asks to be
    /// hibernated when idle gets a guest that zeroes the pages it frees:
    /// its snapshot is a fraction of the size (QEMU sends a zero page as a
    /// flag; docs/ARCHITECTURE.md, "Hibernation"). So does one with a
    /// claimed volume, which may be encrypted: no freed page of its guest
    /// keeps a copy of a volume key. Others do not: the guest would zero,
    /// and so make resident on the host, all of its memory as it boots (an
    /// idle 256 MiB pod: 390 MB RSS against 269 MB, docs/BENCHMARKS.md,
    /// "KSM"); hibernating one by hand still works, into a larger
    /// snapshot.
    fn node_for(&self, plan: &PodPlan) -> std::borrow::Cow<'_, NodeConfig> {
        let claims = plan
            .volumes
            .iter()
            .any(|v| matches!(v.source, super::volumes::VolumeSource::Claim { .. }));
        let asked = (plan.hibernate_after.is_some() || claims)
            && !self
                .node
                .extra_kernel_args
                .iter()
                .any(|a| a.starts_with("init_on_free="));
        if !asked {
            return std::borrow::Cow::Borrowed(&self.node);
        }
        let mut node = self.node.clone();
        node.extra_kernel_args.push("init_on_free=1".into());
        std::borrow::Cow::Owned(node)
    }

    /// The guest's kernel and initramfs.
    async fn guest(&self) -> Result<podvisor_guest::GuestArtifacts, PodVmError> {
        let opts = podvisor_guest::GuestOptions {
            kernel: self.node.kernel.clone(),
            agent: self.node.agent.clone(),
            extra_modules: vec![],
            cache_dir: self.node.cache_dir.clone(),
        };
        let guest = tokio::task::spawn_blocking(move || podvisor_guest::prepare(&opts))
            .await
            .map_err(|e| PodVmError::Io {
                what: "prepare the guest".into(),
                source: std::io::Error::other(e),
            })??;
        *self.last_guest.lock().unwrap() = Some(guest.clone());
        Ok(guest)
    }

    /// The guest for a VM loaded from a snapshot: the last one booted, if
    /// its files are still there.
    async fn guest_to_load(&self) -> Result<podvisor_guest::GuestArtifacts, PodVmError> {
        let last = self.last_guest.lock().unwrap().clone();
        match last {
            Some(g) if g.kernel.exists() && g.initramfs.exists() => Ok(g),
            _ => self.guest().await,
        }
    }

    /// The VM spec of pod `plan` with `devices`.
    fn spec(
        &self,
        plan: &PodPlan,
        guest: podvisor_guest::GuestArtifacts,
        devices: Vec<Device>,
    ) -> PodVmSpec {
        PodVmSpec {
            id: plan.vm_id(),
            cpus: plan.cpus,
            memory_mib: plan.memory_mib,
            guest,
            devices,
            pci: Default::default(),
            memory: podvisor_vmm::MemoryBacking::Anonymous,
            memory_merge: self.memory_merge && !plan.isolated,
            die_with_parent: false,
            netns: None,
        }
    }

    /// The pod's NIC for its next VM: its network attached first if it
    /// has none yet (the intent record is written before anything is
    /// made; a host port another pod holds is refused before that), then
    /// a fresh tap. `None` without pod networking.
    async fn pod_nic(&self, plan: &PodPlan) -> Result<Option<PodNic>, PodVmError> {
        let Some(networks) = &self.networks else {
            if let Some(m) = plan.port_mappings.first() {
                return Err(PodVmError::Network(format!(
                    "host port {m} needs pod networking, which this host daemon runs without"
                )));
            }
            return Ok(None);
        };
        if networks.attachment(&plan.uid).is_none() {
            if networks.record(&plan.uid).is_some() {
                // A half-made attachment (a daemon died during its ADD).
                networks.detach(&plan.uid).await?;
            }
            let request = AttachRequest {
                id: plan.uid.clone(),
                pod: PodIdentity {
                    namespace: plan.namespace.clone(),
                    name: plan.name.clone(),
                    uid: plan.uid.clone(),
                },
                port_mappings: plan.port_mappings.clone(),
            };
            networks.attach(request).await?;
            tracing::info!(pod = %plan.key(), ips = ?networks.attachment(&plan.uid).map(|a| a.pod_ips()), "pod network attached");
        }
        Ok(Some(network::pod_nic(networks, &plan.uid).await?))
    }
}

#[async_trait]
impl Launcher for VmLauncher {
    fn recover(&self, run_dir: &Path, records: &[PodRecord]) -> Result<(), RuntimeError> {
        check_socket_paths(run_dir)?;
        stop_unrecorded_vms(run_dir, records);
        Ok(())
    }

    async fn prepare(&self, plan: &PodPlan) -> Result<Prepared, ImageProblem> {
        let sizing = runtime_sizing(plan);
        // Archives go with runtime sizing, and never to isolated pods.
        let archives =
            self.jvm_warm_up.is_some() && !plan.isolated && sizing.iter().any(Option::is_some);
        let images = images::resolve(&self.node, plan, archives).await?;
        let mut archive_keys = Vec::new();
        let mut trainings = Vec::new();
        let containers: Vec<_> = plan
            .containers
            .iter()
            .zip(&images.containers)
            .zip(sizing)
            .map(|((c, img), mut runtime)| {
                let process = process_spec(&img.config, &c.overrides())?;
                if let (Some((_, facts)), Some(sizing)) = (&img.archive, &mut runtime) {
                    jvm_archive::use_archive(sizing, facts);
                }
                let spec = ContainerSpec {
                    id: c.name.clone(),
                    hostname: plan.hostname(),
                    mounts: img.mounts.clone(),
                    process,
                    runtime,
                };
                archive_keys.push(img.archive.as_ref().and(img.archive_key.clone()));
                if let (Some(key), None, Some(top)) =
                    (&img.archive_key, &img.archive, img.chains.last())
                {
                    trainings.push(jvm_archive::TrainingJob {
                        key: key.clone(),
                        top: top.clone(),
                        chains: img.chains.clone(),
                        devices: vm_devices(&images.pmem, &images.disks),
                        container: spec.clone(),
                        cpus: plan.cpus,
                        memory_mib: plan.memory_mib,
                    });
                }
                Ok(spec)
            })
            .collect();
        if let (Some(warm_up), false) = (self.jvm_warm_up, trainings.is_empty()) {
            match self.guest().await {
                Ok(guest) => {
                    for job in trainings {
                        self.trainings
                            .spawn(self.node.clone(), guest.clone(), job, warm_up);
                    }
                }
                Err(e) => {
                    tracing::warn!(pod = %plan.key(), "no JVM training run: {}", podvisor_errors::ErrorChain(&e))
                }
            }
        }
        Ok(Prepared {
            disks: images.disks,
            pmem: images.pmem,
            containers,
            holds: images.holds,
            archive_keys,
        })
    }

    async fn release(&self, holds: &[HeldLayers]) {
        images::release(&self.node, holds).await;
    }

    async fn archive_rejected(&self, key: &str) {
        jvm_archive::forget(&self.node, key).await;
    }

    async fn start(
        &self,
        plan: &PodPlan,
        disks: Vec<BlockDevice>,
        pmem: Vec<PmemDevice>,
    ) -> Result<(Box<dyn Sandbox>, VmmProcess), PodVmError> {
        let guest = self.guest().await?;
        let nic = self.pod_nic(plan).await?;
        let mut devices = vm_devices(&pmem, &disks);
        devices.extend(nic.as_ref().map(PodNic::vm_device));
        let spec = self.spec(plan, guest, devices);
        let mut vm = PodVm::boot(&self.node_for(plan), spec).await?;
        let hostname = plan.hostname();
        let mut config = match &nic {
            Some(nic) => network::guest_config(&nic.guest, &hostname, &network::host_dns()),
            None => network::no_network(&hostname),
        };
        for w in network::apply_pod_dns(&mut config, &plan.dns) {
            tracing::warn!(pod = %plan.key(), "dns: {w}");
        }
        // The VMM has its copy of the tap: ours goes, so the tap goes with
        // the VM.
        drop(nic);
        vm.configure_network(&config).await?;
        let process = vm.vmm_process()?;
        Ok((Box::new(vm), process))
    }

    async fn finished(&self, plan: &PodPlan) {
        let Some(networks) = &self.networks else {
            return;
        };
        if networks.record(&plan.uid).is_none() {
            return;
        }
        match networks.detach(&plan.uid).await {
            Ok(()) => tracing::info!(pod = %plan.key(), "pod network removed"),
            Err(e) => {
                tracing::warn!(pod = %plan.key(), "removing the pod network failed (reconcile retries): {e}", e = podvisor_errors::ErrorChain(&e))
            }
        }
    }

    fn pod_ips(&self, uid: &str) -> Vec<IpAddr> {
        self.networks
            .as_ref()
            .and_then(|n| n.attachment(uid))
            .map(|a| a.pod_ips())
            .unwrap_or_default()
    }

    async fn reconcile(&self, live: &HashSet<String>) {
        let Some(networks) = &self.networks else {
            return;
        };
        let report = networks.reconcile(live).await;
        for id in &report.removed {
            tracing::info!(pod = %id, "removed the network of a pod that is gone");
        }
        for (id, e) in &report.failed {
            tracing::warn!(pod = %id, "removing the network of a pod that is gone failed: {e}", e = podvisor_errors::ErrorChain(e));
        }
        for ns in &report.stray_namespaces {
            tracing::info!(netns = %ns.display(), "removed a network namespace nothing records");
        }
    }

    async fn adopt(&self, record: &VmRecord) -> Result<Box<dyn Sandbox>, PodVmError> {
        let vm = PodVm::adopt(&self.node, &record.vm_id, &record.process).await?;
        Ok(Box::new(vm))
    }

    fn discard(&self, record: &VmRecord) {
        kill_recorded(&record.process);
        let _ = std::fs::remove_dir_all(&record.process.run_dir);
    }

    async fn frames_in(&self, plan: &PodPlan) -> Option<u64> {
        let att = self.networks.as_ref()?.attachment(&plan.uid)?;
        match vm_nic::frames_to_vm(&att.netns, network::TAP_NAME).await {
            Ok(frames) => frames,
            Err(e) => {
                tracing::debug!(pod = %plan.key(), "cannot read the NIC's counters: {e}", e = podvisor_errors::ErrorChain(&e));
                None
            }
        }
    }

    async fn sleep(&self, plan: &PodPlan) -> Result<(), PodVmError> {
        let Some(networks) = &self.networks else {
            return Ok(());
        };
        if networks.attachment(&plan.uid).is_none() {
            return Ok(());
        }
        // A fresh tap (the VM's went with its QEMU), kept here with only
        // the pod's frames let in.
        let nic = network::pod_nic(networks, &plan.uid).await?;
        nic.sleep().map_err(|source| PodVmError::Io {
            what: "let only the pod's frames wait in its tap".into(),
            source,
        })?;
        self.sleeping
            .lock()
            .unwrap()
            .insert(plan.uid.clone(), Arc::new(nic));
        Ok(())
    }

    async fn requested(&self, plan: &PodPlan) -> Result<(), PodVmError> {
        let nic = self.sleeping.lock().unwrap().get(&plan.uid).cloned();
        let Some(nic) = nic else {
            return std::future::pending().await;
        };
        nic.first_frame(None)
            .await
            .map(|_| ())
            .map_err(|source| PodVmError::Io {
                what: "wait for a request for the pod".into(),
                source,
            })
    }

    async fn wake(
        &self,
        plan: &PodPlan,
        hibernated: &Hibernated,
        key: &SnapshotKey,
        timeout: Duration,
    ) -> Result<(Box<dyn Sandbox>, VmmProcess), HibernateError> {
        let load_error = |source| HibernateError::Load {
            id: hibernated.snapshot.id.clone(),
            source,
        };
        let started = std::time::Instant::now();
        let guest = self.guest_to_load().await.map_err(load_error)?;
        let sleeping = self.sleeping.lock().unwrap().remove(&plan.uid);
        let nic = match sleeping {
            Some(nic) => Some(nic),
            // Nothing waited (pod networking is off, or making the
            // sleeping tap failed): a fresh tap.
            None => self.pod_nic(plan).await.map_err(load_error)?.map(Arc::new),
        };
        // Every frame reaches the tap again; those that waited are sent in
        // once the VM runs (a loading VMM would garble them).
        let waiting = match &nic {
            Some(nic) => nic.wake().unwrap_or_else(|e| {
                tracing::warn!(pod = %plan.key(), "cannot take the frames that waited: {e}");
                vec![]
            }),
            None => vec![],
        };
        // As the VM booted: the pmem devices in the same order, so each
        // gets the guest-physical range the snapshot's guest knows it at.
        let mut devices = vm_devices(&hibernated.pmem, &hibernated.disks);
        devices.extend(nic.as_deref().map(PodNic::vm_device));
        let spec = self.spec(plan, guest, devices);
        let context = hibernation::snapshot_context(plan);
        let from = podvisor_hibernate::WakeFrom {
            snapshot: &hibernated.snapshot,
            key,
            context: &context,
            hostname: &plan.hostname(),
            timeout,
        };
        let replay = async {
            if let Some(nic) = &nic
                && !waiting.is_empty()
                && let Err(e) = nic.replay(&waiting).await
            {
                tracing::warn!(pod = %plan.key(), "the frames that waited for the pod were not sent in again (clients send them again): {e}");
            }
        };
        let vm = podvisor_hibernate::wake(&self.node, spec, from, replay).await?;
        tracing::debug!(pod = %plan.key(), elapsed = ?started.elapsed(), frames = waiting.len(), "wake: VM runs, waiting frames sent in");
        let process = vm.vmm_process().map_err(load_error)?;
        Ok((Box::new(vm), process))
    }

    fn forget_sleep(&self, plan: &PodPlan) {
        self.sleeping.lock().unwrap().remove(&plan.uid);
    }
}

/// A pod VM's storage devices: its layers on virtio-pmem first (the
/// order fixes their place in guest memory), then its disks.
pub(super) fn vm_devices(pmem: &[PmemDevice], disks: &[BlockDevice]) -> Vec<Device> {
    pmem.iter()
        .cloned()
        .map(Device::Pmem)
        .chain(disks.iter().cloned().map(Device::Block))
        .collect()
}

/// A pod VM whose state is in a snapshot, paused.
struct PausedVm(podvisor_hibernate::Saved);

#[async_trait]
impl Paused for PausedVm {
    fn snapshot(&self) -> &Snapshot {
        &self.0.snapshot
    }

    fn key(&self) -> &SnapshotKey {
        &self.0.key
    }

    async fn stop(self: Box<Self>) {
        self.0.commit().await;
    }

    async fn resume(self: Box<Self>, why: HibernateError) -> NotSaved {
        let not = self.0.abort(why).await;
        NotSaved {
            sandbox: not.pod.map(|p| Box::new(p) as Box<dyn Sandbox>),
            error: not.error,
        }
    }
}

#[async_trait]
impl Sandbox for PodVm {
    async fn send(&mut self, msg: &HostMessage) -> Result<(), PodVmError> {
        PodVm::send(self, msg).await
    }

    async fn next_event(&mut self) -> Result<GuestMessage, PodVmError> {
        PodVm::next_event(self).await
    }

    async fn reject(&mut self, what: String) -> PodVmError {
        PodVm::reject(self, what).await
    }

    async fn shutdown(self: Box<Self>, grace: Duration) {
        PodVm::shutdown(*self, grace).await
    }

    fn detach(self: Box<Self>) {
        PodVm::detach(*self)
    }

    async fn save(
        self: Box<Self>,
        dir: &Path,
        context: &[u8],
    ) -> Result<Box<dyn Paused>, NotSaved> {
        match podvisor_hibernate::save(*self, dir, context).await {
            Ok(saved) => Ok(Box::new(PausedVm(saved))),
            Err(not) => Err(NotSaved {
                sandbox: not.pod.map(|p| Box::new(p) as Box<dyn Sandbox>),
                error: not.error,
            }),
        }
    }
}

/// Kills the VMM process `process` if it is still that process.
fn kill_recorded(process: &VmmProcess) {
    if process.check_alive().is_err() {
        return;
    }
    if let Ok(h) = podvisor_vmm::process::ProcessHandle::open(process.pid)
        && process.check_alive().is_ok()
    {
        let _ = h.signal(libc::SIGKILL);
    }
}

/// Unix socket paths hold at most 107 bytes; the VM sockets live at
/// `<run>/pods/<16 chars>/control.sock`.
fn check_socket_paths(run_dir: &Path) -> Result<(), RuntimeError> {
    let longest = run_dir.join("pods/0123456789abcdef/control.sock");
    let len = longest.as_os_str().len();
    if len > 107 {
        return Err(RuntimeError::BadRequest(format!(
            "the state directory's path is too long for the VM sockets under it \
             ({} is {len} bytes, unix sockets allow 107): choose a shorter --state-dir",
            longest.display()
        )));
    }
    Ok(())
}

/// Kills the VMM process of every run directory under `<run>/pods` that no
/// record names, and removes those directories.
fn stop_unrecorded_vms(run_dir: &Path, records: &[PodRecord]) {
    let known: HashSet<&str> = records
        .iter()
        .filter_map(|r| r.vm.as_ref().map(|v| v.vm_id.as_str()))
        .collect();
    let Ok(entries) = std::fs::read_dir(run_dir.join("pods")) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if known.contains(name.as_str()) {
            continue;
        }
        let socket = entry.path().join("control.sock").display().to_string();
        for pid in processes_mentioning(&socket) {
            tracing::warn!(pid, dir = %entry.path().display(), "stopping a VM no record knows");
            // SAFETY: kill(2) on a pid that was just seen serving `socket`.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let _ = std::fs::remove_dir_all(entry.path());
    }
}

/// Pids of processes whose command line contains `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| podvisor_vmm::process::cmdline(*pid).is_ok_and(|c| c.contains(needle)))
        .collect()
}
