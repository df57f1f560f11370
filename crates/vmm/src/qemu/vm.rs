//! A running QEMU VM, whether this process started it (its child) or
//! adopted it from an earlier one (held through a pidfd): one type, with
//! only waiting and killing depending on which.

use std::io::Write;
use std::path::PathBuf;

use async_trait::async_trait;
use tokio::process::Child;

use super::pci::PciSlots;
use super::qmp::Qmp;
use super::{STATE_TIMEOUT, hotplug, snapshot};
use crate::cgroup::VmCgroup;
use crate::device::{Device, DeviceKind, PciAddress, PciLayout};
use crate::process::ProcessHandle;
use crate::{AfterSave, Vm, VmExit, VmPaths, VmmError};

/// How this process holds the QEMU process.
pub enum QemuProcess {
    /// Started here: a child, whose exit status is known.
    Child { child: Child, stderr_log: PathBuf },
    /// Started by another process (a host daemon before it restarted):
    /// not our child, so its exit status is unknown ([`VmExit::Unknown`]).
    Adopted(ProcessHandle),
}

/// A QEMU VM: its process, QMP session and PCI slots.
pub struct QemuVm {
    process: QemuProcess,
    pid: u32,
    paths: VmPaths,
    qmp: Option<Qmp>,
    /// Some guest memory is a shared file mapping: RAM in a
    /// memory-backend-file, or a virtio-pmem device (a layer disk). Saved
    /// states leave it out (`x-ignore-shared`): its content is in the file.
    shared_memory: bool,
    slots: PciSlots,
    /// The process's control group, removed once it has exited.
    cgroup: Option<VmCgroup>,
    /// Keeps the console log bounded while this handle watches the VM.
    console_watch: tokio::task::JoinHandle<()>,
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        self.console_watch.abort();
    }
}

impl QemuVm {
    pub(crate) fn new(
        process: QemuProcess,
        pid: u32,
        paths: VmPaths,
        qmp: Qmp,
        shared_memory: bool,
        slots: PciSlots,
    ) -> Self {
        Self {
            process,
            pid,
            console_watch: crate::console::watch(paths.console_log.clone()),
            paths,
            qmp: Some(qmp),
            shared_memory,
            slots,
            cgroup: None,
        }
    }

    /// The VM's process is in `cgroup`, to be removed when it exits.
    pub(crate) fn with_cgroup(mut self, cgroup: Option<VmCgroup>) -> Self {
        self.cgroup = cgroup;
        self
    }

    /// The QMP session, for backend-specific operations inside this crate.
    pub fn qmp(&mut self) -> Option<&mut Qmp> {
        self.qmp.as_mut()
    }

    /// Whether some guest memory is a shared file mapping (guest RAM in a
    /// file, or a pmem device), which saved states leave out.
    pub fn shared_memory(&self) -> bool {
        self.shared_memory
    }

    /// What QEMU wrote to its standard error (a VM started here).
    pub fn stderr(&self) -> Option<String> {
        match &self.process {
            QemuProcess::Child { stderr_log, .. } => std::fs::read_to_string(stderr_log).ok(),
            QemuProcess::Adopted(_) => None,
        }
    }

    fn control(&mut self) -> Result<&mut Qmp, VmmError> {
        self.qmp.as_mut().ok_or(VmmError::Gone)
    }

    fn wait_error(&self, source: std::io::Error) -> VmmError {
        VmmError::Io {
            what: format!("wait for qemu {}", self.pid),
            source,
        }
    }
}

/// A child's exit status as a [`VmExit`].
pub fn to_exit(status: std::process::ExitStatus) -> VmExit {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => VmExit::Exited(c),
        (None, Some(s)) => VmExit::Killed(s),
        (None, None) => VmExit::Exited(-1),
    }
}

#[async_trait]
impl Vm for QemuVm {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn paths(&self) -> &VmPaths {
        &self.paths
    }

    async fn wait(&mut self) -> Result<VmExit, VmmError> {
        let exit = match &mut self.process {
            QemuProcess::Child { child, .. } => child.wait().await.map(to_exit),
            QemuProcess::Adopted(handle) => handle.exited().await.map(|()| VmExit::Unknown),
        };
        let exit = exit.map_err(|e| self.wait_error(e))?;
        self.qmp = None;
        self.console_watch.abort();
        if let Some(group) = self.cgroup.take() {
            group.remove();
        }
        Ok(exit)
    }

    fn try_wait(&mut self) -> Result<Option<VmExit>, VmmError> {
        match &mut self.process {
            QemuProcess::Child { child, .. } => match child.try_wait() {
                Ok(status) => Ok(status.map(to_exit)),
                Err(e) => Err(self.wait_error(e)),
            },
            QemuProcess::Adopted(handle) => Ok(handle.has_exited().then_some(VmExit::Unknown)),
        }
    }

    async fn kill(&mut self) -> Result<VmExit, VmmError> {
        if let Some(exit) = self.try_wait()? {
            return Ok(exit);
        }
        if let QemuProcess::Adopted(handle) = &self.process {
            handle
                .signal(libc::SIGKILL)
                .map_err(|source| VmmError::Io {
                    what: format!("kill qemu {}", self.pid),
                    source,
                })?;
        } else {
            self.start_kill();
        }
        self.wait().await
    }

    fn start_kill(&mut self) {
        match &mut self.process {
            QemuProcess::Child { child, .. } => {
                let _ = child.start_kill();
            }
            QemuProcess::Adopted(handle) => {
                let _ = handle.signal(libc::SIGKILL);
            }
        }
    }

    async fn pause(&mut self) -> Result<(), VmmError> {
        self.control()?.execute("stop", None).await?;
        Ok(())
    }

    async fn resume(&mut self) -> Result<(), VmmError> {
        self.control()?.execute("cont", None).await?;
        Ok(())
    }

    async fn save_state(
        &mut self,
        sink: Box<dyn Write + Send>,
        after: AfterSave,
    ) -> Result<u64, VmmError> {
        let shared_memory = self.shared_memory;
        let qmp = self.control()?;
        let written = snapshot::save(qmp, shared_memory, sink, STATE_TIMEOUT).await?;
        if after == AfterSave::Running {
            qmp.execute("cont", None).await?;
        }
        Ok(written)
    }

    async fn add_device(&mut self, device: Device) -> Result<PciAddress, VmmError> {
        let kind = device.kind();
        let hotplug_error = |reason: String| VmmError::Hotplug {
            kind,
            id: device.id().to_string(),
            reason,
        };
        if !kind.is_hotpluggable() {
            return Err(hotplug_error(format!(
                "a {kind} device cannot be added to a running VM"
            )));
        }
        let addr = match self.slots.place(device.id(), kind) {
            Ok(addr) => addr,
            Err(VmmError::NoPciSlot(why)) => return Err(hotplug_error(why)),
            Err(e) => return Err(hotplug_error(e.to_string())),
        };
        let qmp = match self.qmp.as_mut() {
            Some(qmp) => qmp,
            None => {
                self.slots.release(device.id());
                return Err(VmmError::Gone);
            }
        };
        if let Err(e) = hotplug::add(qmp, &device, addr).await {
            self.slots.release(device.id());
            return Err(e);
        }
        if kind == DeviceKind::Pmem {
            self.shared_memory = true;
        }
        Ok(addr)
    }

    async fn remove_device(&mut self, id: &str) -> Result<(), VmmError> {
        let addr = self.slots.address_of(id).ok_or_else(|| VmmError::Unplug {
            id: id.to_string(),
            reason: "the VM has no such PCI device".into(),
        })?;
        let kind = self
            .slots
            .user(addr)
            .map(|u| u.kind)
            .ok_or(VmmError::Gone)?;
        let qmp = self.control()?;
        hotplug::remove(qmp, id, kind, hotplug::UNPLUG_TIMEOUT).await?;
        self.slots.release(id);
        Ok(())
    }

    fn pci_layout(&self) -> PciLayout {
        self.slots.layout()
    }
}
