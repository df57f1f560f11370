//! Adopting a QEMU process another process launched (a host daemon before
//! it restarted): check that the recorded pid is still that QEMU, hold it
//! through a pidfd, and reconnect its QMP socket.

use std::io::Write;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::qmp::Qmp;
use crate::process::{ProcessHandle, VmmProcess, cmdline};
use crate::{DiskSpec, Vm, VmExit, VmPaths, VmmError};

/// How long to retry connecting QMP (QEMU accepts a new client once it has
/// noticed that the previous one, a dead process, is gone).
const QMP_RECONNECT: Duration = Duration::from_secs(10);

/// A QEMU process adopted through [`crate::Hypervisor::adopt`]. It is not
/// our child: its exit status is unknown ([`VmExit::Unknown`]).
pub struct AdoptedQemuVm {
    process: ProcessHandle,
    pid: u32,
    paths: VmPaths,
    qmp: Option<Qmp>,
    /// Guest RAM is a memory-backend-file (as its command line says).
    ram_in_file: bool,
}

impl AdoptedQemuVm {
    /// The QMP session.
    pub fn qmp(&mut self) -> Option<&mut Qmp> {
        self.qmp.as_mut()
    }

    fn control(&mut self) -> Result<&mut Qmp, VmmError> {
        self.qmp.as_mut().ok_or(VmmError::Gone)
    }
}

fn not_adoptable(record: &VmmProcess, why: String) -> VmmError {
    VmmError::NotAdoptable {
        pid: record.pid,
        reason: why,
    }
}

/// Adopts the QEMU process `record` describes.
pub async fn adopt(record: &VmmProcess) -> Result<AdoptedQemuVm, VmmError> {
    let paths = VmPaths::in_dir(&record.run_dir);
    record
        .check_alive()
        .map_err(|why| not_adoptable(record, why))?;
    // The pid must belong to the QEMU that serves this run directory.
    let control = paths.control_socket.display().to_string();
    let args = cmdline(record.pid).map_err(|e| not_adoptable(record, e.to_string()))?;
    if !args.contains(&control) {
        return Err(not_adoptable(
            record,
            format!("it is not the VMM whose control socket is {control}"),
        ));
    }
    let process =
        ProcessHandle::open(record.pid).map_err(|e| not_adoptable(record, e.to_string()))?;
    // The pidfd now pins the process; check again that it is still the one
    // recorded (not a new process that got the pid in between).
    record
        .check_alive()
        .map_err(|why| not_adoptable(record, why))?;
    let started = Instant::now();
    let qmp = loop {
        if process.has_exited() {
            return Err(not_adoptable(record, "it exited".into()));
        }
        match Qmp::connect(&paths.control_socket).await {
            Ok(q) => break q,
            Err(e) if started.elapsed() > QMP_RECONNECT => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    tracing::debug!(pid = record.pid, "adopted qemu");
    Ok(AdoptedQemuVm {
        process,
        pid: record.pid,
        paths,
        qmp: Some(qmp),
        ram_in_file: args.contains("memory-backend-file"),
    })
}

#[async_trait]
impl Vm for AdoptedQemuVm {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn paths(&self) -> &VmPaths {
        &self.paths
    }

    async fn wait(&mut self) -> Result<VmExit, VmmError> {
        self.process.exited().await.map_err(|source| VmmError::Io {
            what: format!("wait for qemu {}", self.pid),
            source,
        })?;
        self.qmp = None;
        Ok(VmExit::Unknown)
    }

    fn try_wait(&mut self) -> Result<Option<VmExit>, VmmError> {
        Ok(self.process.has_exited().then_some(VmExit::Unknown))
    }

    async fn kill(&mut self) -> Result<VmExit, VmmError> {
        if self.process.has_exited() {
            return Ok(VmExit::Unknown);
        }
        self.process
            .signal(libc::SIGKILL)
            .map_err(|source| VmmError::Io {
                what: format!("kill qemu {}", self.pid),
                source,
            })?;
        self.wait().await
    }

    fn start_kill(&mut self) {
        let _ = self.process.signal(libc::SIGKILL);
    }

    async fn pause(&mut self) -> Result<(), VmmError> {
        self.control()?.execute("stop", None).await?;
        Ok(())
    }

    async fn resume(&mut self) -> Result<(), VmmError> {
        self.control()?.execute("cont", None).await?;
        Ok(())
    }

    async fn save_state(&mut self, sink: Box<dyn Write + Send>) -> Result<u64, VmmError> {
        let ram_in_file = self.ram_in_file;
        super::snapshot::save(self.control()?, ram_in_file, sink, super::STATE_TIMEOUT).await
    }

    async fn hotplug_disk(&mut self, index: usize, disk: &DiskSpec) -> Result<(), VmmError> {
        super::hotplug::hotplug_disk(self.control()?, index, disk).await
    }
}
