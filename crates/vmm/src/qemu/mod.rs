//! The QEMU backend: builds the command line from a [`VmSpec`], starts
//! `qemu-system-x86_64`, and connects its QMP socket. Saving and restoring
//! states is [`snapshot`] (migration through a pipe, `x-ignore-shared` for
//! RAM in a file, `-S -incoming defer`); hot-plugging disks is [`hotplug`].

pub mod adopt;
pub mod cmdline;
#[cfg(test)]
mod fake_qemu;
pub mod hotplug;
pub mod qmp;
pub mod snapshot;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::process::{Child, Command};

use crate::{Accel, DiskSpec, Hypervisor, MemoryBacking, Vm, VmExit, VmPaths, VmSpec, VmmError};
use cmdline::*;
use qmp::Qmp;

/// How long QEMU may take to create its QMP socket.
const CONTROL_SOCKET_TIMEOUT: Duration = Duration::from_secs(15);
/// How long saving or loading a VM state may take.
const STATE_TIMEOUT: Duration = Duration::from_secs(300);
/// Id of the memory backend object holding guest RAM in a file.
const RAM_BACKEND_ID: &str = "ram0";
/// Version of the devices and addresses podvisor gives a VM. Bump it when
/// the command line changes in a way a saved state would notice (a device
/// added or moved), so templates saved before are seen as stale.
pub const DEVICE_LAYOUT: u32 = 1;

/// The QEMU backend.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// The `qemu-system-x86_64` binary.
    pub binary: PathBuf,
}

impl Qemu {
    /// Uses `$PODVISOR_QEMU` if set, else `qemu-system-x86_64` from `PATH`.
    pub fn from_env() -> Self {
        Self {
            binary: std::env::var_os("PODVISOR_QEMU")
                .map(PathBuf::from)
                .unwrap_or_else(|| "qemu-system-x86_64".into()),
        }
    }

    /// The binary's path, looked up in `PATH` when it has no `/`, with
    /// symbolic links resolved.
    pub fn resolved_binary(&self) -> Option<PathBuf> {
        let found = if self.binary.components().count() > 1 {
            Some(self.binary.clone())
        } else {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join(&self.binary))
                    .find(|p| p.is_file())
            })
        }?;
        std::fs::canonicalize(found).ok()
    }

    /// The typed command line for a spec; `incoming`: wait for a saved
    /// state instead of booting.
    pub fn command_line(spec: &VmSpec, incoming: bool) -> Result<QemuCommandLine, VmmError> {
        if spec.cpus == 0 || spec.memory_mib < 64 {
            return Err(VmmError::InvalidSpec(format!(
                "need at least 1 CPU and 64 MiB (got {} CPUs, {} MiB)",
                spec.cpus, spec.memory_mib
            )));
        }
        let paths = VmPaths::in_dir(&spec.run_dir);
        let mut disks = Vec::new();
        for (i, d) in spec.disks.iter().enumerate() {
            check_serial(&d.serial)?;
            let slot = disk_slot(i).ok_or_else(|| {
                VmmError::InvalidSpec(format!(
                    "{} disks do not fit on the PCI bus (at most {})",
                    spec.disks.len(),
                    LAST_SLOT - FIRST_DISK_SLOT + 1
                ))
            })?;
            disks.push(VirtioBlk {
                id: hotplug::node_name(i),
                path: d.path.clone(),
                read_only: d.read_only,
                serial: d.serial.clone(),
                slot,
            });
        }
        let (memory_backend, memory_backends) = match &spec.memory {
            MemoryBacking::Anonymous => (None, vec![]),
            MemoryBacking::File { path, shared } => (
                Some(RAM_BACKEND_ID.to_string()),
                vec![MemoryBackendFile {
                    id: RAM_BACKEND_ID.into(),
                    mem_path: path.clone(),
                    size_mib: spec.memory_mib,
                    share: *shared,
                    read_only: false,
                }],
            ),
        };
        Ok(QemuCommandLine {
            base: BaseOptions {
                name: spec.name.clone(),
            },
            machine: Machine {
                kind: "pc".into(),
                accel: spec.accel,
                memory_backend,
                tcg_tb_size_mib: Some(64),
            },
            cpu: Cpu::for_accel(spec.accel),
            smp: Smp { cpus: spec.cpus },
            memory: Memory {
                size_mib: spec.memory_mib,
                hotplug: None,
            },
            memory_backends,
            boot: DirectBoot {
                kernel: spec.kernel.clone(),
                initramfs: spec.initramfs.clone(),
                cmdline: spec.kernel_cmdline.clone(),
            },
            console: SerialConsole {
                log: paths.console_log,
            },
            qmp: QmpSocket {
                path: paths.control_socket,
            },
            agent: AgentChannel {
                socket: paths.agent_socket,
                port_name: podvisor_proto::AGENT_PORT_NAME.into(),
            },
            disks,
            rng: Some(VirtioRng),
            vmgenid: Some(VmGenId),
            incoming: incoming.then_some(IncomingDeferred),
        })
    }

    /// Starts QEMU for `spec` and connects QMP.
    async fn spawn(&self, spec: &VmSpec, incoming: bool) -> Result<QemuVm, VmmError> {
        let cl = Self::command_line(spec, incoming)?;
        let paths = VmPaths::in_dir(&spec.run_dir);
        // A restored VM may reuse a directory: stale sockets would make
        // the wait below connect to nothing.
        for socket in [&paths.control_socket, &paths.agent_socket] {
            let _ = std::fs::remove_file(socket);
        }
        let stderr_log = spec.run_dir.join("qemu.log");
        let stderr = std::fs::File::create(&stderr_log).map_err(|source| VmmError::Io {
            what: format!("create {}", stderr_log.display()),
            source,
        })?;
        let mut cmd = Command::new(&self.binary);
        cmd.args(cl.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(false);
        if spec.die_with_parent {
            // Own process group: a Ctrl-C at the user's terminal goes to
            // podvisor, which stops the container, never straight to QEMU.
            cmd.process_group(0);
            // SAFETY: prctl is async-signal-safe and touches no memory of ours.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        } else {
            // A VM that outlives its launcher (a host daemon) gets its own
            // session: no signal or hang-up of the launcher's terminal or
            // process group reaches it.
            // SAFETY: setsid is async-signal-safe and touches no memory of ours.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        if spec.accel == Accel::Tcg {
            // Under TCG, transparent huge pages (which QEMU asks for on guest
            // RAM and its translation buffer) cost more than they give: each
            // first touch of a 2 MiB region is zeroed whole, a boot to the
            // agent took 13% longer with them (docs/BENCHMARKS.md), and idle
            // VMs keep the untouched rest of every huge page. With KVM they
            // shorten the guest's page walks, so they stay.
            // SAFETY: prctl is async-signal-safe and touches no memory of ours.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|source| VmmError::Spawn {
            binary: self.binary.display().to_string(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        tracing::debug!(pid, accel = %spec.accel, incoming, "qemu started");

        // QEMU creates its sockets before it starts the guest. Wait for QMP,
        // failing fast if QEMU exits (bad arguments, missing file).
        let qmp = loop {
            if let Some(status) = child.try_wait().map_err(|source| VmmError::Io {
                what: "wait for qemu".into(),
                source,
            })? {
                let exit = to_exit(status);
                let qemu_err = std::fs::read_to_string(&stderr_log).unwrap_or_default();
                return Err(VmmError::EarlyExit {
                    exit,
                    console_tail: format!(
                        "{}{}",
                        qemu_err.trim(),
                        crate::console_tail(&paths.console_log, 2000)
                    ),
                });
            }
            if paths.control_socket.exists() {
                match Qmp::connect(&paths.control_socket).await {
                    Ok(q) => break q,
                    Err(e) if started.elapsed() > CONTROL_SOCKET_TIMEOUT => return Err(e.into()),
                    Err(_) => {}
                }
            }
            if started.elapsed() > CONTROL_SOCKET_TIMEOUT {
                let _ = child.start_kill();
                return Err(VmmError::Timeout(
                    CONTROL_SOCKET_TIMEOUT,
                    "the QEMU control socket".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        Ok(QemuVm {
            child,
            pid,
            paths,
            qmp: Some(qmp),
            accel: spec.accel,
            ram_in_file: spec.memory != MemoryBacking::Anonymous,
            stderr_log,
        })
    }
}

#[async_trait]
impl Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    async fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, VmmError> {
        Ok(Box::new(self.spawn(spec, false).await?))
    }

    async fn adopt(&self, record: &crate::VmmProcess) -> Result<Box<dyn Vm>, VmmError> {
        Ok(Box::new(adopt::adopt(record).await?))
    }

    async fn restore(
        &self,
        spec: &VmSpec,
        state: Box<dyn Read + Send>,
    ) -> Result<Box<dyn Vm>, VmmError> {
        let started = Instant::now();
        let mut vm = self.spawn(spec, true).await?;
        tracing::debug!(elapsed = ?started.elapsed(), "qemu waits for the state");
        let ram_in_file = vm.ram_in_file;
        let result = match vm.qmp.as_mut() {
            Some(qmp) => snapshot::restore(qmp, ram_in_file, state, STATE_TIMEOUT).await,
            None => Err(VmmError::Gone),
        };
        if let Err(e) = result {
            // QEMU exits when it rejects a state; its reason is on stderr.
            let exit = tokio::time::timeout(Duration::from_secs(2), vm.child.wait()).await;
            let _ = vm.child.start_kill();
            let _ = vm.child.wait().await;
            let qemu_err = std::fs::read_to_string(&vm.stderr_log).unwrap_or_default();
            let qemu_err = qemu_err.trim();
            return Err(match (exit, qemu_err.is_empty()) {
                (Ok(_), false) => VmmError::Restore(qemu_err.to_string()),
                _ => e,
            });
        }
        Ok(Box::new(vm))
    }

    fn version_fingerprint(&self) -> Result<String, VmmError> {
        use std::os::unix::fs::MetadataExt;
        let path = self.resolved_binary().ok_or_else(|| VmmError::Spawn {
            binary: self.binary.display().to_string(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })?;
        let md = std::fs::metadata(&path).map_err(|source| VmmError::Io {
            what: format!("stat {}", path.display()),
            source,
        })?;
        Ok(format!(
            "{} size={} mtime={}.{} ino={} layout={DEVICE_LAYOUT}",
            path.display(),
            md.len(),
            md.mtime(),
            md.mtime_nsec(),
            md.ino()
        ))
    }

    fn version(&self) -> Result<String, VmmError> {
        let out = std::process::Command::new(&self.binary)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|source| VmmError::Spawn {
                binary: self.binary.display().to_string(),
                source,
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        match text.lines().next().map(str::trim) {
            Some(line) if out.status.success() && !line.is_empty() => {
                Ok(format!("{line}; podvisor device layout {DEVICE_LAYOUT}"))
            }
            _ => Err(VmmError::InvalidSpec(format!(
                "{} --version printed no version",
                self.binary.display()
            ))),
        }
    }
}

/// A QEMU process started by [`Qemu::launch`] or [`Qemu::restore`].
pub struct QemuVm {
    child: Child,
    pid: u32,
    paths: VmPaths,
    qmp: Option<Qmp>,
    accel: Accel,
    /// Guest RAM is a memory-backend-file (leave it out of saved states).
    ram_in_file: bool,
    stderr_log: PathBuf,
}

impl QemuVm {
    /// The QMP session, for backend-specific operations inside this crate.
    pub fn qmp(&mut self) -> Option<&mut Qmp> {
        self.qmp.as_mut()
    }

    /// The accelerator this VM runs on.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    fn control(&mut self) -> Result<&mut Qmp, VmmError> {
        self.qmp.as_mut().ok_or(VmmError::Gone)
    }
}

fn to_exit(status: std::process::ExitStatus) -> VmExit {
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
        let status = self.child.wait().await.map_err(|source| VmmError::Io {
            what: "wait for qemu".into(),
            source,
        })?;
        self.qmp = None;
        Ok(to_exit(status))
    }

    fn try_wait(&mut self) -> Result<Option<VmExit>, VmmError> {
        let status = self.child.try_wait().map_err(|source| VmmError::Io {
            what: "wait for qemu".into(),
            source,
        })?;
        Ok(status.map(to_exit))
    }

    async fn kill(&mut self) -> Result<VmExit, VmmError> {
        if let Some(exit) = self.try_wait()? {
            return Ok(exit);
        }
        let _ = self.child.start_kill();
        self.wait().await
    }

    fn start_kill(&mut self) {
        let _ = self.child.start_kill();
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
        snapshot::save(self.control()?, ram_in_file, sink, STATE_TIMEOUT).await
    }

    async fn hotplug_disk(&mut self, index: usize, disk: &DiskSpec) -> Result<(), VmmError> {
        hotplug::hotplug_disk(self.control()?, index, disk).await
    }
}

#[cfg(test)]
#[path = "launch_tests.rs"]
mod tests;
